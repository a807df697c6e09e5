"""This node's cluster, kept in the data dir: its name and root, the membership records, the open invites.

Files under ``data_dir`` (the directory is created 0700; every file 0600, written
atomically: temp file in the same directory, fsync, then rename or link)::

    identity.json   this node's key pair (identity.py)
    cluster.json    {"version": 2, "name": ..., "root": <the founder's node id>}
    members.json    the membership records, in the order accepted (members.py)
    invites.json    open invites: the SHA-256 of each token's secret, its expiry, whether it was used

An invite token (``quorum-node invite``) is
``qrm2.<inviter node id>.<base64url(32 random bytes)>.<base64url(addresses)>``:
the new machine connects to one of the addresses, checks that the node there
holds the inviter's key (the id names it), and proves it knows the secret; the
secret is used once and expires (10 minutes by default). A token grants one
admission and nothing else: it is not a cluster secret.

``cluster.json`` of version 1 held a shared secret (the clusters before keys);
``legacy_cluster`` reads it for ``quorum-node cluster migrate``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import msgspec

__all__ = [
    "CLUSTER_FILE",
    "INVITES_FILE",
    "MEMBERS_FILE",
    "RELAY_FILE",
    "TOKEN_PREFIX",
    "Cluster",
    "Invite",
    "InviteToken",
    "LegacyCluster",
    "create_invite",
    "leave_cluster",
    "legacy_cluster",
    "load_cluster",
    "load_member_records",
    "load_relay",
    "parse_invite",
    "save_member_records",
    "store_cluster",
    "store_relay",
    "take_invite",
]

CLUSTER_FILE = "cluster.json"
MEMBERS_FILE = "members.json"
INVITES_FILE = "invites.json"
RELAY_FILE = "relay.json"  # the relay a node joined through (``join_by_relay``): its URL and token
TOKEN_PREFIX = "qrm2"

_MAX_NAME_CHARS = 64
_NODE_ID_RE = re.compile(r"[0-9a-f]{24}")
_MAX_INVITES = 256


def _check_name(name: str) -> str:
    if not name or len(name) > _MAX_NAME_CHARS or not name.isprintable() or name != name.strip():
        raise ValueError(
            f"cluster name must be 1-{_MAX_NAME_CHARS} printable characters without leading or trailing spaces"
        )
    return name


class Cluster(msgspec.Struct, frozen=True, kw_only=True):
    """The cluster this node belongs to: its name, and its root (the founder's node id, which names it)."""

    name: str
    root: str


class LegacyCluster(msgspec.Struct, frozen=True, kw_only=True):
    """A cluster of the shared-secret days (``cluster.json`` version 1): for ``cluster migrate`` only."""

    name: str
    secret: bytes

    def __repr__(self) -> str:
        return f"LegacyCluster(name={self.name!r}, secret=<hidden>)"

    __str__ = __repr__


class _ClusterFile(msgspec.Struct, kw_only=True):
    version: int = 2
    name: str
    root: str = ""
    secret: str = ""  # version 1 only


_file_decoder = msgspec.json.Decoder(_ClusterFile)
_encode = msgspec.json.Encoder().encode


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc


def _ensure_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        return  # made already (maybe a moment ago, by a node and a CLI starting at once)
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


def _read_cluster_file(data_dir: Path) -> _ClusterFile | None:
    path = data_dir / CLUSTER_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        stored = _file_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise ValueError(f"{path} is damaged: {exc}") from None
    if stored.version not in (1, 2):
        raise ValueError(f"{path}: unsupported version {stored.version}")
    return stored


def load_cluster(data_dir: Path) -> Cluster | None:
    """The keyed cluster this node belongs to, or None (no cluster, or one of the shared-secret days)."""
    stored = _read_cluster_file(data_dir)
    if stored is None or stored.version == 1:
        return None
    if not _NODE_ID_RE.fullmatch(stored.root):
        raise ValueError(f"{data_dir / CLUSTER_FILE} is damaged: bad root")
    return Cluster(name=_check_name(stored.name), root=stored.root)


def legacy_cluster(data_dir: Path) -> LegacyCluster | None:
    """The shared-secret cluster of ``cluster.json`` version 1, if that is what the data dir holds."""
    stored = _read_cluster_file(data_dir)
    if stored is None or stored.version != 1:
        return None
    secret = _b64decode(stored.secret)
    if not secret:
        raise ValueError(f"{data_dir / CLUSTER_FILE} is damaged: empty secret")
    return LegacyCluster(name=_check_name(stored.name), secret=secret)


def store_cluster(data_dir: Path, cluster: Cluster, records_json: bytes, *, force: bool = False) -> None:
    """Write the membership (cluster file and records). Refuses (FileExistsError) to replace another keyed
    cluster unless ``force``; a shared-secret ``cluster.json`` is replaced (that is the migration). Joining
    another cluster drops the open invites (they were for the one this node leaves)."""
    _ensure_dir(data_dir)
    existing = load_cluster(data_dir)
    if existing is not None and existing.root != cluster.root and not force:
        raise FileExistsError(
            f"this node already belongs to cluster {existing.name!r} (root {existing.root}); "
            "leave it first (`quorum-node cluster leave`) or pass --force"
        )
    if existing is None or existing.root != cluster.root:
        # invites this node gave for the cluster it was in would admit their holders into this one
        with contextlib.suppress(FileNotFoundError):
            (data_dir / INVITES_FILE).unlink()
    _write_private(data_dir / MEMBERS_FILE, records_json, replace=True)
    _write_private(
        data_dir / CLUSTER_FILE, _encode(_ClusterFile(name=_check_name(cluster.name), root=cluster.root)), replace=True
    )


def load_member_records(data_dir: Path) -> bytes:
    """The raw membership records (a JSON list; ``b"[]"`` when there are none yet)."""
    try:
        return (data_dir / MEMBERS_FILE).read_bytes()
    except FileNotFoundError:
        return b"[]"


def save_member_records(data_dir: Path, records_json: bytes) -> None:
    _ensure_dir(data_dir)
    _write_private(data_dir / MEMBERS_FILE, records_json, replace=True)


class _RelayFile(msgspec.Struct, kw_only=True):
    url: str
    token: str


def store_relay(data_dir: Path, url: str, token: str) -> None:
    """The relay this node joined through: its node reaches the cluster there (unless told another)."""
    _ensure_dir(data_dir)
    _write_private(data_dir / RELAY_FILE, _encode(_RelayFile(url=url, token=token)), replace=True)


def load_relay(data_dir: Path) -> tuple[str, str] | None:
    """The stored relay's URL and token, or None (none stored, or the file is damaged)."""
    try:
        stored = msgspec.json.decode((data_dir / RELAY_FILE).read_bytes(), type=_RelayFile)
    except (FileNotFoundError, msgspec.DecodeError):
        return None
    return (stored.url, stored.token) if stored.url and stored.token else None


def leave_cluster(data_dir: Path) -> bool:
    """Forget the stored membership; True if there was one."""
    found = False
    for name in (CLUSTER_FILE, MEMBERS_FILE, INVITES_FILE, RELAY_FILE):
        with contextlib.suppress(FileNotFoundError):
            (data_dir / name).unlink()
            found = True
    return found


# -- invites ------------------------------------------------------------------------------


class Invite(msgspec.Struct, frozen=True, kw_only=True):
    hash: str  # sha256 of the token's secret, hex
    expires: float
    created: float
    used: bool = False
    confirm: bool = False  # the inviter confirms the machine before it is admitted (``invite --admit``)


_invites_decoder = msgspec.json.Decoder(list[Invite])


class InviteToken(msgspec.Struct, frozen=True, kw_only=True):
    inviter: str
    secret: bytes
    addresses: tuple[str, ...]

    def __repr__(self) -> str:
        return f"InviteToken(inviter={self.inviter!r}, addresses={self.addresses!r}, secret=<hidden>)"

    __str__ = __repr__

    @property
    def secret_hash(self) -> str:
        return hashlib.sha256(self.secret).hexdigest()

    def encode(self) -> str:
        return ".".join(
            (TOKEN_PREFIX, self.inviter, _b64encode(self.secret), _b64encode(",".join(self.addresses).encode("ascii")))
        )


def parse_invite(token: str) -> InviteToken:
    """Decode an invite token; ValueError saying what is wrong (never echoing the token)."""
    parts = token.strip().split(".")
    if len(parts) != 4 or parts[0] != TOKEN_PREFIX:
        if parts and parts[0] == "qrm1":
            raise ValueError(
                "this is a join token of the shared-secret days: ask for a new invite "
                "(`quorum-node invite` on a member)"
            )
        raise ValueError("an invite token has the form qrm2.<node id>.<secret>.<addresses> (is it a Quorum invite?)")
    _, inviter, secret_part, addr_part = parts
    if not _NODE_ID_RE.fullmatch(inviter):
        raise ValueError("invite token is damaged: bad node id")
    try:
        secret = _b64decode(secret_part)
        addresses = tuple(a for a in _b64decode(addr_part).decode("ascii").split(",") if a)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("invite token is damaged") from None
    if len(secret) != 32:
        raise ValueError("invite token is damaged: bad secret")
    if len(addresses) > 16 or any(len(a) > 300 for a in addresses):
        raise ValueError("invite token is damaged: bad addresses")
    return InviteToken(inviter=inviter, secret=secret, addresses=addresses)


@contextlib.contextmanager
def _invites_locked(data_dir: Path) -> Iterator[list[list[Invite]]]:
    _ensure_dir(data_dir)
    fd = os.open(data_dir / ".invites.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = data_dir / INVITES_FILE
        try:
            invites = _invites_decoder.decode(path.read_bytes())
        except FileNotFoundError:
            invites = []
        except msgspec.DecodeError:
            invites = []  # a damaged file only loses open invites: make new ones
        out: list[list[Invite]] = [invites]
        yield out
        if out[0] is not invites:
            _write_private(path, _encode(out[0]), replace=True)
    finally:
        os.close(fd)


def create_invite(
    data_dir: Path, *, inviter: str, addresses: tuple[str, ...], ttl_s: float, now: float, confirm: bool = False
) -> InviteToken:
    """Make a one-time invite valid for ``ttl_s`` seconds; only its hash is stored. ``confirm``: the machine
    that uses it waits for the inviter to confirm it (``JoinHandler``, ``invite --admit``)."""
    token = InviteToken(inviter=inviter, secret=secrets.token_bytes(32), addresses=addresses)
    with _invites_locked(data_dir) as box:
        live = [i for i in box[0] if i.expires > now and not i.used][-(_MAX_INVITES - 1) :]
        box[0] = [*live, Invite(hash=token.secret_hash, expires=now + ttl_s, created=now, confirm=confirm)]
    return token


def take_invite(data_dir: Path, secret_hash: str, now: float) -> str:
    """Use the invite whose secret hashes to ``secret_hash``: "ok" ("confirm": ok, once the inviter confirms
    the machine), or why not ("unknown", "used", "expired").

    Compared in constant time; an invite is used at most once.
    """
    import hmac

    with _invites_locked(data_dir) as box:
        found = None
        for inv in box[0]:
            if hmac.compare_digest(inv.hash, secret_hash):
                found = inv
        if found is None:
            return "unknown"
        if found.used:
            return "used"
        if found.expires <= now:
            return "expired"
        box[0] = [
            msgspec.structs.replace(i, used=True) if i is found else i for i in box[0] if i is found or i.expires > now
        ]
    return "confirm" if found.confirm else "ok"
