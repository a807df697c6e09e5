"""structlog set-up, the node's and the relay's: console renderer on a TTY, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

import msgspec
import structlog

__all__ = ["configure_logging"]


def _serialize(obj: object, default: object = None) -> str:
    # JSONRenderer(serializer=msgspec.json.encode) fails: it passes ``default`` and wants str back
    return msgspec.json.encode(obj, enc_hook=default if callable(default) else str).decode()


def configure_logging(fmt: str = "auto", level: str = "info", *, quiet: Iterable[str] = ()) -> None:
    """Configure structlog once for the process (stderr).

    ``quiet`` names stdlib loggers of libraries (``websockets``) whose chatter stays out of ours: they
    log errors only, or less where ``level`` asks for less.
    """
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_serialize)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    for name in quiet:
        logging.getLogger(name).setLevel(max(lvl, logging.ERROR))
