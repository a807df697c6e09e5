"""The error tree of quorum-relay.

Branches follow who handles them::

    RelayError
    ├── ConfigError        bad settings or tokens file → the CLI prints one line, exits 2
    │                      (on a SIGHUP reload: logged, the old tokens stay in force)
    └── ProtocolViolation  a node broke the wire rules → its socket is closed
                           with ``CLOSE_PROTOCOL``

Foreign exceptions are mapped where they enter: ``msgspec.DecodeError`` in
``hub`` (a frame that does not decode is a ``ProtocolViolation``),
``websockets.ConnectionClosed`` in ``conn`` and ``server`` (the end of a
connection, not an error), ``OSError``/``ssl.SSLError`` in ``settings`` and
``tokens`` (a ``ConfigError``).
"""

from __future__ import annotations

__all__ = ["ConfigError", "ProtocolViolation", "RelayError"]


class RelayError(Exception):
    """Root of every error quorum-relay raises on purpose."""


class ConfigError(RelayError):
    """The settings or the tokens are wrong; the process cannot start (or reload)."""


class ProtocolViolation(RelayError):
    """A node sent something the wire protocol forbids; the reason is sent as the close reason."""
