"""One typed settings object, built once from TOML file, environment and CLI.

Precedence: CLI flag > ``QUORUM_*`` environment variable > config file > default.
Every setting has all three spellings: the field name is the TOML key, its
upper-case form prefixed with ``QUORUM_`` is the environment variable, and its
dashed form is the flag. Unknown keys, bad URLs and unknown engine kinds are
``ConfigError`` (the CLI exits 2 with a one-line message).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec

from .errors import ConfigError
from .names import MODEL_ID_PATTERN, NAME_MAX, is_name

__all__ = [
    "BACKEND_KINDS",
    "DEFAULT_DETECT_PORTS",
    "BackendSpec",
    "Settings",
    "load_settings",
    "parse_backend_arg",
]

BACKEND_KINDS = ("ollama", "llamacpp", "vllm", "sglang", "tgi", "lmstudio", "localai", "mlx", "openai")

# Default ports of the engines (reference/engines.md §1); 8080 is shared by
# llama.cpp, LocalAI and MLX, and llama.cpp's newest default is 9931.
DEFAULT_DETECT_PORTS = (11434, 8080, 9931, 8000, 30000, 3000, 1234)


class BackendSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An engine the user named explicitly."""

    kind: str
    url: str
    api_key: str | None = None
    name: str | None = None

    def __repr__(self) -> str:  # never show the key
        return f"BackendSpec(kind={self.kind!r}, url={self.url!r}, api_key={'***' if self.api_key else None})"


class ShardSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A model this node serves with other members' memory (``[[shards]]``; ``quorum-node shard``)."""

    model: str  # a GGUF file on this node
    across: int = 2  # how many members hold its layers
    alias: str | None = None  # its name in the catalog (default: the file's stem, as llama-server's)


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything quorum-node can be told. Units are in the names."""

    host: str = "0.0.0.0"
    port: int = 32768
    ollama_port: int | None = None  # a second port for the same API (the Ollama surface's tools: 11435); None: off
    name: str = ""
    data_dir: str = ""
    backends: tuple[BackendSpec, ...] = ()
    # auto-detection of engines on this machine
    detect: bool = True
    detect_host: str = "127.0.0.1"
    detect_ports: tuple[int, ...] = DEFAULT_DETECT_PORTS
    probe_interval_s: float = 2.0
    probe_timeout_s: float = 0.5
    embedded_engine: bool = True
    # the embedded engine's context in tokens: 0 is the model's own (SmolLM2's 8,192, about 190 MB of KV cache)
    embedded_ctx_size: int = 0
    cache_dir: str = ""
    # logging
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: str = "info"
    # upstream timeouts; streams have no total timeout
    connect_timeout_s: float = 3.0
    first_token_timeout_s: float = 120.0
    idle_timeout_s: float = 60.0
    request_timeout_s: float = 600.0
    max_body_bytes: int = 32 * 1024 * 1024
    drain_timeout_s: float = 3.0
    # what slow or hostile clients may cost the node
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keepalive_timeout_s: float = 30.0
    max_connections_per_address: int = 512
    # what engines and peers may cost the node: models listed (more are dropped, with a warning), peers
    # known, and the whole (non-streamed) answers held in memory at once, node-wide (past it: 503 node_busy)
    max_models_per_engine: int = 4096
    max_models_per_peer: int = 4096
    max_peers: int = 256
    max_buffered_answers_bytes: int = 256 * 1024 * 1024
    # cluster
    cluster: str | None = None  # the shared-secret clusters of before keys: read only by `cluster migrate`
    cluster_secret: str | None = None
    peer_port: int | None = None  # mutual-TLS listener for peers (cluster/tls.py); default port + 1 (0 with port 0)
    mdns: bool = True
    mdns_interfaces: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    max_attempts: int = 3
    # outlier ejection of a local engine's model that keeps failing (breaker.py): after this many failures in a
    # row it gets no request for holder_reset_s, then one probe; each failed probe doubles the wait, up to the max
    holder_failures: int = 3
    holder_reset_s: float = 5.0
    holder_max_reset_s: float = 60.0
    # how many requests a holder runs at once, where its engine does not say (llama.cpp's slots do; vLLM's and
    # SGLang's /metrics, while requests wait in theirs); 0: no limit of the node's (Ollama and the others queue
    # what they cannot run yet themselves; Ollama's "server busy" is a 429). Past every holder's, a
    # request waits in the admission queue (admission.py): up to queue_max requests node-wide (0: none wait,
    # busy is 429 at once), each for at most queue_timeout_s (then 429)
    holder_concurrency: int = 0
    queue_max: int = 256
    queue_timeout_s: float = 30.0
    # conversations keep to one holder (affinity.py), so its engine's prompt cache serves their later turns:
    # the node by rendezvous hashing, and among its engines the one it was placed on first, placed on one that
    # holds under affinity_load_bound times the mean number of conversations (1: evenly)
    affinity: bool = True
    affinity_load_bound: float = 1.0
    # a name that pins one quantization of a model (a GGUF stem, a quantized tag) is served by holders of
    # those weights only; with serve_variants, by the model's other quantizations too, after them
    serve_variants: bool = False
    # names of your own for models (TOML [model_aliases] "assistant" = "llama3.2:3b-instruct"; env
    # QUORUM_MODEL_ALIASES="assistant=llama3.2:3b-instruct,..."): for what the node cannot tell by itself
    model_aliases: dict[str, str] = {}
    # sharded models (cluster/sharding.py, cluster/lending.py): this node leads the [[shards]] it is given,
    # each over `across` members that lend memory (an rpc-server on their loopback, reached only through the
    # peer link, on a lease renewed every shard_lease_s / 3); with lend, it lends up to lend_max_workers itself
    shards: tuple[ShardSpec, ...] = ()
    lend: bool = True
    lend_max_workers: int = 2
    lend_cache_dir: str = ""  # where lent rpc-servers keep the tensors they were sent (default: <cache_dir>/rpc-cache)
    shard_lease_s: float = 15.0
    health_interval_s: float = 2.0
    peer_down_after_s: float = 10.0
    # the relay (quorum-relay) that joins this node to peers on other networks
    relay: str | None = None
    relay_token: str | None = None
    # API keys (control/keys.py): loopback callers need one too
    require_key: bool = False
    key_tombstone_retention_days: float = 90.0  # a revoked key's record is kept this long; 0: for good
    keys_last_used_sync_s: float = 60.0  # how often keys' last uses are exchanged with the peers
    api_key: str | None = None  # the admin key the command's tools (keys, usage, cluster) send; the node ignores it
    # the usage ledger (SQLite in data_dir) and the Prometheus metrics (GET /metrics)
    ledger: bool = True
    ledger_retention_days: float = 90.0  # 0: keep every record
    metrics: bool = True
    # browsers (api/cors.py): origins whose pages may call the node; "*" is any page (unsafe with loopback trust)
    cors_origins: tuple[str, ...] = ()
    # the Responses API's stored responses (api/responses.py): in memory, bounded
    responses_store_max_entries: int = 1024
    responses_store_max_bytes: int = 64 * 1024 * 1024
    responses_store_ttl_s: float = 3600.0

    def __repr__(self) -> str:  # never the secrets (cluster secret, relay token, engine keys)
        return (
            f"Settings(name={self.name!r}, host={self.host!r}, port={self.port}, backends={self.backends!r}, "
            f"relay={self.relay!r})"
        )


_FIELDS = {f.name: f for f in msgspec.structs.fields(Settings)}
_BOOL_TRUE = {"1", "true", "yes", "on"}
_BOOL_FALSE = {"0", "false", "no", "off", ""}


def parse_backend_arg(text: str) -> BackendSpec:
    """Parse ``KIND=URL`` as given to ``--backend``."""
    kind, sep, url = text.partition("=")
    if not sep or not url:
        raise ConfigError(f"backend {text!r}: expected KIND=URL, e.g. ollama=http://127.0.0.1:11434")
    return BackendSpec(kind=kind.strip().lower(), url=url.strip())


_MODEL_NAME = re.compile(MODEL_ID_PATTERN)


def _parse_backends_env(text: str) -> list[Any]:
    text = text.strip()
    if text.startswith("["):
        try:
            backends: list[Any] = json.loads(text)  # JSON that starts with "[" is an array
        except json.JSONDecodeError as e:
            raise ConfigError(f"QUORUM_BACKENDS: not valid JSON: {e}") from None
        return backends
    return [msgspec.structs.asdict(parse_backend_arg(p)) for p in text.split(",") if p.strip()]


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _FIELDS:
        key = "QUORUM_" + name.upper()
        if key not in env:
            continue
        raw = env[key]
        if name == "backends":
            out[name] = _parse_backends_env(raw)
        elif name in ("detect_ports", "mdns_interfaces", "peers", "cors_origins"):
            out[name] = [p.strip() for p in raw.split(",") if p.strip()]
        elif name == "model_aliases":
            pairs = [p.partition("=") for p in raw.split(",") if p.strip()]
            if any(not sep or not k.strip() or not v.strip() for k, sep, v in pairs):
                raise ConfigError(f"{key}: expected NAME=MODEL,..., got {raw!r}")
            out[name] = {k.strip(): v.strip() for k, _, v in pairs}
        else:
            out[name] = raw
    return out


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    # TOML's ``[[backends]]`` arrays of tables land as ``backends``
    return data


def _coerce(name: str, value: Any) -> Any:
    """Turn env strings into the field's type; TOML values pass unchanged."""
    if not isinstance(value, str):
        return value
    field = _FIELDS[name]
    t = field.type
    if t is bool:
        low = value.strip().lower()
        if low in _BOOL_TRUE:
            return True
        if low in _BOOL_FALSE:
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if t is int:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if t is float:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    return value


def _check_url(where: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: bad URL {url!r} (expected http://HOST:PORT)")
    try:
        _ = parts.port  # raises for a port that is no number
    except ValueError:
        raise ConfigError(f"{where}: bad port in URL {url!r}") from None


def normalize_origin(text: str) -> str:
    """An origin as browsers send it (``scheme://host[:port]``, lower case), or ``*``; else ConfigError."""
    text = text.strip()
    if text == "*":
        return text
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"cors_origins: bad port in {text!r}") from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username
        or parts.password
    ):
        raise ConfigError(f"cors_origins: {text!r} is not an origin (expected scheme://host[:port], or *)")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


def _validate(s: Settings) -> Settings:
    for i, b in enumerate(s.backends):
        where = f"backend {b.name or i + 1}"
        if b.kind not in BACKEND_KINDS:
            raise ConfigError(f"{where}: unknown kind {b.kind!r} (one of {', '.join(BACKEND_KINDS)})")
        _check_url(where, b.url)
    if not (0 <= s.port <= 65535):
        raise ConfigError(f"port: {s.port} is not a TCP port")
    if s.peer_port is not None and not (0 <= s.peer_port <= 65535):
        raise ConfigError(f"peer_port: {s.peer_port} is not a TCP port")
    if s.ollama_port is not None and not (0 <= s.ollama_port <= 65535):
        raise ConfigError(f"ollama_port: {s.ollama_port} is not a TCP port")
    for p in s.detect_ports:
        if not (0 < p <= 65535):
            raise ConfigError(f"detect_ports: {p} is not a TCP port")
    for peer in s.peers:
        host, sep, port = peer.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"peer {peer!r}: expected HOST:PORT")
    for ip in s.mdns_interfaces:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ConfigError(f"mdns_interfaces: {ip!r} is not an IP address") from None
    if s.relay is not None:
        parts = urlsplit(s.relay)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ConfigError(f"relay: bad URL {s.relay!r} (expected ws://HOST:PORT or wss://HOST)")
        if not s.relay_token:
            raise ConfigError("relay: needs relay_token (--relay-token or QUORUM_RELAY_TOKEN)")
    if bool(s.cluster) != bool(s.cluster_secret):
        raise ConfigError("cluster and cluster_secret must be given together")
    for name in (
        "connect_timeout_s",
        "first_token_timeout_s",
        "idle_timeout_s",
        "request_timeout_s",
        "header_timeout_s",
        "body_timeout_s",
        "keepalive_timeout_s",
    ):
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name}: must be positive")
    if s.max_body_bytes <= 0:
        raise ConfigError("max_body_bytes: must be positive")
    if s.max_connections_per_address < 1:
        raise ConfigError("max_connections_per_address: must be at least 1")
    for name in ("max_models_per_engine", "max_models_per_peer", "max_peers", "max_buffered_answers_bytes"):
        if getattr(s, name) < 1:
            raise ConfigError(f"{name}: must be at least 1")
    if not is_name(s.name):
        raise ConfigError(f"name: {s.name!r} is not a node name (at most {NAME_MAX} characters, no control characters)")
    for b in s.backends:
        if b.name is not None and not (b.name and is_name(b.name)):
            raise ConfigError(f"backend name {b.name!r}: at most {NAME_MAX} characters, no control characters")
    if s.drain_timeout_s < 0:
        raise ConfigError("drain_timeout_s: must not be negative")
    if s.max_attempts < 1:
        raise ConfigError("max_attempts: must be at least 1")
    if s.holder_failures < 1 or not 0 < s.holder_reset_s <= s.holder_max_reset_s:
        raise ConfigError("holder_*: holder_failures at least 1, and 0 < holder_reset_s <= holder_max_reset_s")
    for alias, target in s.model_aliases.items():
        if not (_MODEL_NAME.fullmatch(alias) and _MODEL_NAME.fullmatch(target)) or alias == target:
            raise ConfigError(f"model_aliases: {alias!r} = {target!r} is not a name for another model")
    for shard in s.shards:
        if not 1 <= shard.across <= 16:
            raise ConfigError(f"shards: {shard.model}: across must be 1 to 16, got {shard.across}")
        if shard.alias is not None and not _MODEL_NAME.fullmatch(shard.alias):
            raise ConfigError(f"shards: {shard.model}: {shard.alias!r} is not a model name")
    if s.embedded_ctx_size < 0:
        raise ConfigError("embedded_ctx_size: 0 (the model's own context) or a number of tokens")
    if s.lend_max_workers < 1 or not 3.0 <= s.shard_lease_s <= 300.0:
        raise ConfigError("lend_max_workers: at least 1; shard_lease_s: 3 to 300 seconds")
    if s.holder_concurrency < 0:
        raise ConfigError(f"holder_concurrency: must be 0 (no limit) or more, got {s.holder_concurrency}")
    if s.queue_max < 0:
        raise ConfigError(f"queue_max: must not be negative (0 turns the queue off), got {s.queue_max}")
    if not s.queue_timeout_s > 0:
        raise ConfigError(f"queue_timeout_s: must be positive, got {s.queue_timeout_s}")
    if not s.affinity_load_bound >= 1.0:
        raise ConfigError(
            f"affinity_load_bound: must be at least 1.0 (a multiple of the mean load), got {s.affinity_load_bound}"
        )
    if s.cors_origins:
        s = msgspec.structs.replace(s, cors_origins=tuple(dict.fromkeys(normalize_origin(o) for o in s.cors_origins)))
    if s.responses_store_max_entries < 0 or s.responses_store_max_bytes < 0 or s.responses_store_ttl_s <= 0:
        raise ConfigError("responses_store_*: entries and bytes must not be negative, the TTL must be positive")
    if not s.ledger_retention_days >= 0:
        raise ConfigError("ledger_retention_days: must not be negative (0 keeps every record)")
    if not s.key_tombstone_retention_days >= 0:
        raise ConfigError("key_tombstone_retention_days: must not be negative (0 keeps revoked keys for good)")
    if not s.keys_last_used_sync_s > 0:
        raise ConfigError("keys_last_used_sync_s: must be positive")
    return s


def load_settings(
    cli: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Settings:
    """Build the one settings object. ``cli`` holds only the flags actually given."""
    env = os.environ if env is None else env
    cli = dict(cli or {})
    config_file = cli.pop("config", None) or config_file or env.get("QUORUM_CONFIG")
    merged: dict[str, Any] = {}
    if config_file:
        merged.update(_read_file(config_file))
    merged.update({k: _coerce(k, v) for k, v in _from_env(env).items()})
    for k, v in cli.items():
        if v is not None:
            merged[k] = v
    if "backends" in merged:
        merged["backends"] = [
            msgspec.structs.asdict(b) if isinstance(b, BackendSpec) else b for b in merged["backends"]
        ]
    merged.setdefault("name", socket.gethostname()[:NAME_MAX])
    merged.setdefault("data_dir", str(Path("~/.local/share/quorum").expanduser()))
    merged.setdefault("cache_dir", str(Path("~/.cache/quorum").expanduser()))
    merged["data_dir"] = str(Path(merged["data_dir"]).expanduser())
    merged["cache_dir"] = str(Path(merged["cache_dir"]).expanduser())
    try:
        settings = msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"config: {e}") from None
    return _validate(settings)
