"""structlog set-up for the relay: console renderer on a TTY, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys

import msgspec
import structlog

__all__ = ["configure_logging"]


def _serialize(obj: object, default: object = None) -> str:
    return msgspec.json.encode(obj, enc_hook=default if callable(default) else str).decode()


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog once for the process (stderr)."""
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
    # websockets logs through the stdlib; keep its handshake noise (bad requests, EOFs) out of ours.
    logging.getLogger("websockets").setLevel(logging.ERROR if lvl < logging.ERROR else lvl)
