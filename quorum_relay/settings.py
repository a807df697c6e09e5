"""One typed settings object for quorum-relay, built once from environment and CLI.

Precedence: CLI flag > ``QUORUM_RELAY_*`` environment variable > default. The
field name, upper-cased and prefixed with ``QUORUM_RELAY_``, is the variable;
its dashed form is the flag (``--token`` is repeatable and its variable
``QUORUM_RELAY_TOKEN`` takes a comma- or space-separated list). Byte sizes
accept ``KiB``/``MiB``/``GiB`` (or ``k``/``m``/``g``) suffixes. Bad values are
``ConfigError`` (the CLI exits 2 with a one-line message).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from .errors import ConfigError
from .limits import parse_networks
from .tokens import TOKEN_RE

__all__ = ["ENV_PREFIX", "Settings", "load_settings", "parse_bytes", "ssl_context"]

ENV_PREFIX = "QUORUM_RELAY_"
KiB = 1024
MiB = 1024 * KiB


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything quorum-relay can be told. Units are in the names."""

    host: str = "0.0.0.0"
    port: int = 8787
    tokens: tuple[str, ...] = ()
    tokens_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # what one node may cost the relay
    max_frame_bytes: int = 256 * KiB
    max_streams_per_node: int = 1024
    send_queue_bytes: int = 8 * MiB
    ping_interval_s: float = 20.0
    idle_timeout_s: float = 60.0
    # admission, per source address (IPv6: per /64)
    handshake_rate_per_s: float = 5.0
    handshake_burst: int = 20
    max_connections_per_address: int = 64
    max_connections: int = 10000
    trusted_proxies: tuple[str, ...] = ()
    open_timeout_s: float = 10.0
    close_timeout_s: float = 1.0
    metrics_token: str = ""
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def __post_init__(self) -> None:
        _validate(self)

    def __repr__(self) -> str:  # never show a token
        return (
            f"Settings(host={self.host!r}, port={self.port}, tokens=<{len(self.tokens)}>, "
            f"tokens_file={self.tokens_file!r}, tls={bool(self.tls_cert)})"
        )

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


def _validate(s: Settings) -> None:
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"port {s.port}: expected 0-65535")
    for t in s.tokens:
        if not TOKEN_RE.fullmatch(t):
            raise ConfigError("a token is 16-512 characters of [A-Za-z0-9._~+/=-]")
    if bool(s.tls_cert) != bool(s.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if not 1 * KiB <= s.max_frame_bytes <= 64 * MiB:
        raise ConfigError(f"max_frame_bytes {s.max_frame_bytes}: expected 1 KiB - 64 MiB")
    if s.send_queue_bytes < s.max_frame_bytes:
        raise ConfigError("send_queue_bytes must be at least max_frame_bytes (one frame must fit)")
    for name in ("max_streams_per_node", "max_connections_per_address", "max_connections", "handshake_burst"):
        if getattr(s, name) < 1:
            raise ConfigError(f"{name} must be at least 1")
    for name in ("ping_interval_s", "idle_timeout_s", "handshake_rate_per_s", "open_timeout_s", "close_timeout_s"):
        if not getattr(s, name) > 0:
            raise ConfigError(f"{name} must be positive")
    if s.ping_interval_s >= s.idle_timeout_s:
        raise ConfigError("ping_interval_s must be shorter than idle_timeout_s (a pong must have time to come back)")
    try:
        parse_networks(s.trusted_proxies)
    except ValueError as e:
        raise ConfigError(f"trusted_proxies: {e}") from None
    if s.metrics_token and not TOKEN_RE.fullmatch(s.metrics_token):
        raise ConfigError("metrics_token: 16-512 characters of [A-Za-z0-9._~+/=-]")


_FIELDS = {f.name: f for f in msgspec.structs.fields(Settings)}
_SIZE_RE = re.compile(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", re.IGNORECASE)
_SCALE = {"": 1, "k": KiB, "m": MiB, "g": 1024 * MiB}


def parse_bytes(text: str) -> int:
    """``"256KiB"`` → 262144; ``ValueError`` if it is not a size."""
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r} is not a byte size (e.g. 262144, 256KiB, 8MiB)")
    return int(m.group(1)) * _SCALE[m.group(2).lower()]


def _split_list(text: str) -> list[str]:
    return [p for p in re.split(r"[,\s]+", text) if p]


def _from_env(env: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    out: dict[str, Any] = {}
    unknown: list[str] = []
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        name = var[len(ENV_PREFIX) :].lower()
        if name in ("token", "tokens"):
            out["tokens"] = _split_list(value)
        elif name == "trusted_proxies":
            out[name] = _split_list(value)
        elif name in _FIELDS:
            out[name] = value
        else:
            unknown.append(var)
    return out, unknown


def _coerce(name: str, value: Any) -> Any:
    """Strings from env/flags → the field's type."""
    if not isinstance(value, str):
        return value
    typ = _FIELDS[name].type
    try:
        if name.endswith("_bytes"):
            return parse_bytes(value)
        if typ is int:
            return int(value)
        if typ is float:
            return float(value)
    except ValueError as e:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}: {e}") from None
    return value


def load_settings(
    cli: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> tuple[Settings, list[str]]:
    """Settings from CLI values (already typed, only those given) over env; also the unknown env names.

    Unknown ``QUORUM_RELAY_*`` variables are returned rather than refused: the
    environment is shared with the node, whose own ``QUORUM_RELAY_TOKEN`` and
    friends may sit next to the relay's; the CLI warns about them.
    """
    raw, unknown = _from_env(env or {})
    raw.update({k: v for k, v in (cli or {}).items() if v is not None})
    try:
        values = {k: _coerce(k, v) for k, v in raw.items()}
        return msgspec.convert(values, Settings), unknown
    except msgspec.ValidationError as e:
        raise ConfigError(f"settings: {e}") from None


def ssl_context(s: Settings) -> ssl.SSLContext | None:
    """The server TLS context for ``wss://`` directly, or ``None``."""
    if not s.tls:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(s.tls_cert, s.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"TLS certificate {s.tls_cert} / key {s.tls_key}: {e}") from None
    return ctx
