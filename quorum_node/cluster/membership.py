"""Who this node is and which cluster it belongs to, kept in the data dir.

Files under ``data_dir`` (the directory is created 0700)::

    node_id        this node's stable random id (one line), 0600
    cluster.json   {"version": 1, "name": ..., "secret": <base64url>}, 0600

Both are written atomically (temp file in the same directory, fsync, then
rename or link), so a crash leaves either the old file or the new one.

A join token (``qrm1.<base64url(name)>.<base64url(secret)>``) carries the
cluster secret itself: anyone holding it can join the cluster and sign
requests as a member. Treat it like a password.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import secrets
from pathlib import Path

import msgspec

from quorum_node.cluster.signing import ClusterKeys, derive_keys

__all__ = [
    "CLUSTER_FILE",
    "NODE_ID_FILE",
    "TOKEN_PREFIX",
    "Cluster",
    "cluster_from_cli",
    "init_cluster",
    "join_cluster",
    "leave_cluster",
    "load_cluster",
    "load_or_create_node_id",
    "parse_join_token",
]

NODE_ID_FILE = "node_id"
CLUSTER_FILE = "cluster.json"
TOKEN_PREFIX = "qrm1"

_SECRET_BYTES = 32
_MAX_SECRET_BYTES = 1024
_MAX_NAME_CHARS = 64
_NODE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class Cluster(msgspec.Struct, frozen=True, kw_only=True):
    """A cluster membership: its name and shared secret.

    ``repr``/``str`` never show the secret.
    """

    name: str
    secret: bytes

    def keys(self) -> ClusterKeys:
        """The signing key and fingerprint derived from the secret."""
        return derive_keys(self.secret)

    @property
    def fingerprint(self) -> str:
        """Public cluster id (16 hex chars), safe to advertise and log."""
        return derive_keys(self.secret).fingerprint

    def join_token(self) -> str:
        """A token that lets another node join. It contains the secret: keep it private."""
        return ".".join((TOKEN_PREFIX, _b64encode(self.name.encode("utf-8")), _b64encode(self.secret)))

    def __repr__(self) -> str:
        return f"Cluster(name={self.name!r}, fingerprint={self.fingerprint!r}, secret=<hidden>)"

    __str__ = __repr__

    def __rich_repr__(self):  # msgspec offers one that would print the secret
        yield "name", self.name
        yield "fingerprint", self.fingerprint


class _ClusterFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    version: int = 1
    name: str
    secret: str


_file_decoder = msgspec.json.Decoder(_ClusterFile)
_file_encoder = msgspec.json.Encoder()


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc


def _check_name(name: str) -> str:
    if not name or len(name) > _MAX_NAME_CHARS or not name.isprintable() or name != name.strip():
        raise ValueError(
            f"cluster name must be 1-{_MAX_NAME_CHARS} printable characters "
            "without leading or trailing spaces"
        )
    return name


def _check_secret(secret: bytes) -> bytes:
    if not secret:
        raise ValueError("cluster secret must not be empty")
    if len(secret) > _MAX_SECRET_BYTES:
        raise ValueError(f"cluster secret must be at most {_MAX_SECRET_BYTES} bytes")
    return secret


def parse_join_token(token: str) -> Cluster:
    """Decode a join token; raises ValueError saying what is wrong (never echoing the token)."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise ValueError("join token must have the form qrm1.<name>.<secret> (three dot-separated parts)")
    prefix, name_part, secret_part = parts
    if prefix != TOKEN_PREFIX:
        raise ValueError(f"join token must start with '{TOKEN_PREFIX}.' (is it a Quorum join token?)")
    try:
        name = _b64decode(name_part).decode("utf-8")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("join token is damaged: the name part is not valid base64url UTF-8") from exc
    try:
        secret = _b64decode(secret_part)
    except ValueError as exc:
        raise ValueError("join token is damaged: the secret part is not valid base64url") from exc
    try:
        return Cluster(name=_check_name(name), secret=_check_secret(secret))
    except ValueError as exc:
        raise ValueError(f"join token is invalid: {exc}") from exc


def cluster_from_cli(name: str, secret: str) -> Cluster:
    """Build a cluster from ``--cluster NAME --secret SECRET``.

    The secret string's UTF-8 bytes are the cluster secret, so every node given
    the same string lands in the same cluster. HKDF does not stretch weak
    input, and the fingerprint is advertised on the LAN, so a short or guessable
    string can be brute-forced offline: use a long random one (or
    ``init``/``join``).
    """
    return Cluster(name=_check_name(name), secret=_check_secret(secret.encode("utf-8")))


def _ensure_dir(data_dir: Path) -> None:
    if not data_dir.exists():
        data_dir.mkdir(mode=0o700, parents=True)
        os.chmod(data_dir, 0o700)  # mkdir's mode is masked by the umask


def _write_private(path: Path, data: bytes, *, replace: bool) -> bool:
    """Atomically write a 0600 file; with ``replace=False`` return False if it exists."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if present: create-if-absent without a race
            except FileExistsError:
                return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):  # some filesystems cannot fsync directories
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return True


def load_or_create_node_id(data_dir: Path) -> str:
    """Return this node's id, creating and persisting a random one on first run."""
    _ensure_dir(data_dir)
    path = data_dir / NODE_ID_FILE
    if not path.exists():
        _write_private(path, (secrets.token_hex(8) + "\n").encode("ascii"), replace=False)
    node_id = path.read_text(encoding="utf-8", errors="replace").strip()
    if not _NODE_ID_RE.fullmatch(node_id):
        raise ValueError(f"{path} does not hold a valid node id; delete it to get a new one")
    return node_id


def load_cluster(data_dir: Path) -> Cluster | None:
    """Return the stored cluster membership, or None if this node is in no cluster."""
    path = data_dir / CLUSTER_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        stored = _file_decoder.decode(raw)
        if stored.version != 1:
            raise ValueError(f"unsupported version {stored.version}")
        return Cluster(name=_check_name(stored.name), secret=_check_secret(_b64decode(stored.secret)))
    except (msgspec.DecodeError, ValueError) as exc:
        raise ValueError(f"{path} is damaged: {exc}") from exc


def _store(data_dir: Path, cluster: Cluster, *, force: bool) -> Cluster:
    _ensure_dir(data_dir)
    data = _file_encoder.encode(_ClusterFile(name=cluster.name, secret=_b64encode(cluster.secret)))
    path = data_dir / CLUSTER_FILE
    if force:
        _write_private(path, data, replace=True)
        return cluster
    if _write_private(path, data, replace=False):
        return cluster
    existing = load_cluster(data_dir)
    if existing == cluster:
        return cluster  # joining the cluster we are already in is not an error
    raise FileExistsError(
        f"this node already belongs to cluster {existing.name!r} "
        f"(fingerprint {existing.fingerprint}); leave it first or pass force=True"
        if existing is not None
        else f"{path} appeared while writing it"
    )


def init_cluster(data_dir: Path, name: str, *, force: bool = False) -> Cluster:
    """Create a new cluster with a random 32-byte secret and store it.

    Refuses (FileExistsError) when this node already has a cluster, unless
    ``force`` — which drops this node out of that cluster.
    """
    cluster = Cluster(name=_check_name(name), secret=secrets.token_bytes(_SECRET_BYTES))
    return _store(data_dir, cluster, force=force)


def join_cluster(data_dir: Path, token: str, *, force: bool = False) -> Cluster:
    """Join the cluster a join token describes and store it.

    Joining the cluster this node is already in is a no-op; joining another
    one needs ``force``.
    """
    return _store(data_dir, parse_join_token(token), force=force)


def leave_cluster(data_dir: Path) -> bool:
    """Forget the stored cluster membership; True if there was one."""
    try:
        (data_dir / CLUSTER_FILE).unlink()
    except FileNotFoundError:
        return False
    return True
