"""Names that come from outside (peers, engines, mDNS), checked where they enter.

A node's or an engine's name ends up in response headers (``X-Quorum-Node``),
log lines and metric labels. One with a CR or LF in it would end a header
early (aiohttp then refuses to send the answer at all), so every name from a
peer or an engine is printable and bounded before anything else reads it:
the peer messages carry these patterns (``cluster/messages.py``), the mDNS
TXT parser and the engine adapters apply them, and ``safe_name`` guards a
value on its way into a header.
"""

from __future__ import annotations

import functools
import ipaddress
import re

__all__ = [
    "MODEL_ID_MAX",
    "MODEL_ID_PATTERN",
    "NAME_MAX",
    "NAME_PATTERN",
    "NODE_ID_PATTERN",
    "is_loopback",
    "is_model_id",
    "is_name",
    "safe_name",
]

#: A node's (or an engine's) name: at most this many characters.
NAME_MAX = 64
#: A model id or alias as an engine names it (a llama.cpp file path, an HF id): at most this many characters.
MODEL_ID_MAX = 512

# ``\A`` and ``\Z``, not ``^`` and ``$``: ``$`` also matches before a trailing newline.
#: No control characters (CR, LF, NUL, TAB, DEL …), at most ``NAME_MAX`` characters; empty: no name.
NAME_PATTERN = r"\A[^\x00-\x1f\x7f]{0,%d}\Z" % NAME_MAX  # noqa: UP031 — %d keeps the regex braces single
#: A node id (``cluster/membership.py``): a token.
NODE_ID_PATTERN = r"\A[A-Za-z0-9._-]{1,64}\Z"
#: A model id or alias: no control characters, 1 to ``MODEL_ID_MAX`` characters.
MODEL_ID_PATTERN = r"\A[^\x00-\x1f\x7f]{1,%d}\Z" % MODEL_ID_MAX  # noqa: UP031

_NAME = re.compile(NAME_PATTERN)
_MODEL_ID = re.compile(MODEL_ID_PATTERN)


def is_name(value: object) -> bool:
    """Whether ``value`` is an acceptable node or engine name (empty included)."""
    return isinstance(value, str) and _NAME.match(value) is not None


def is_model_id(value: object) -> bool:
    """Whether ``value`` is an acceptable model id or alias."""
    return isinstance(value, str) and _MODEL_ID.match(value) is not None


def safe_name(value: str, fallback: str) -> str:
    """``value`` if it is a non-empty acceptable name, else ``fallback`` (for a header such as ``X-Quorum-Node``)."""
    return value if value and is_name(value) else fallback


@functools.lru_cache(maxsize=4096)  # asked several times per request, of a handful of addresses
def is_loopback(remote: str | None) -> bool:
    """Whether a peer address (``request.remote``) is this machine's loopback (IPv4-mapped too)."""
    if not remote:
        return False
    try:
        ip = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
