"""The peer protocol's messages: what nodes tell each other, as typed Structs decoded once.

Every message is built as one of these Structs by the node that sends it and
decoded into the same Struct by the one that receives it: health
(``Identity``), catalogs (``CatalogAnswer`` of ``catalog.ModelCard``),
membership (``MembersAnswer``, ``MergeAnswer``) and joining (``JoinRequest``,
``JoinAnswer``). The two that carry the control layer's own records live beside
those records, above this layer: ``control/replication.KeysMessage`` (API key
records) and ``control/usage.UsageAnswer`` (ledger rows).

The same messages travel over every link (HTTP on the LAN, streams through the
relay). They tolerate unknown fields (a newer peer may say more) and have
defaults for everything a peer may leave out; anything of the wrong shape is a
``msgspec.ValidationError`` where it is decoded, and the peer's answer is
treated as a failed check.

Names are checked here, where they enter (``names.py``): a node's name, its
engines' names and its models' ids are printable (no CR, LF or other control
character) and bounded, so none can break a header or a log line further on.
A catalog keeps at most ``max_models`` entries (``max_models_per_peer``): the
rest are dropped with a warning, and an entry that does not fit costs only
itself.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import structlog

from ..catalog import ModelCard
from ..names import NAME_PATTERN, NODE_ID_PATTERN
from ..resources import Memory
from .members import Candidate

__all__ = [
    "MAX_MODELS_PER_PEER",
    "CatalogAnswer",
    "CatalogEntry",
    "EngineLoad",
    "Identity",
    "JoinAnswer",
    "JoinRequest",
    "MembersAnswer",
    "MergeAnswer",
    "NodeLoad",
    "decode_catalog",
    "decode_identity",
]

log = structlog.get_logger(__name__)

#: The default of ``max_models_per_peer``: a peer's catalog keeps its first this many models.
MAX_MODELS_PER_PEER = 4096

_Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)]
_Name = Annotated[str, msgspec.Meta(max_length=256, pattern=r"\A[^\x00-\x1f\x7f]*\Z")]  # engine labels, states
_NodeName = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
_NodeId = Annotated[str, msgspec.Meta(pattern=NODE_ID_PATTERN)]
_Token = Annotated[str, msgspec.Meta(max_length=128, pattern=r"\A[^\x00-\x1f\x7f]*\Z")]


class EngineLoad(msgspec.Struct, frozen=True, kw_only=True):
    """One engine of a peer, as its health answer tells it (for presence, never for routing)."""

    name: _Name = ""
    kind: _Name = ""
    state: _Name = ""
    load: _Count = 0
    models: _Count = 0
    capacity: _Count | None = None  # how many requests it runs at once (None: an older peer, which does not say)


class NodeLoad(msgspec.Struct, frozen=True, kw_only=True):
    """How busy a peer is: requests it is answering, and its engines (absent from older peers)."""

    in_flight: _Count = 0
    engines: Annotated[list[EngineLoad], msgspec.Meta(max_length=256)] = []
    waiting: _Count = 0  # requests waiting for a holder with room (its admission queue)
    memory: Memory | None = None  # what it could lend a sharded model (None: an older peer, or it lends none)


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /quorum/v1/health``: who the node is."""

    node_id: _NodeId
    name: _NodeName = ""
    fingerprint: _Token = ""
    proto: int = 1
    catalog_digest: _Token = ""
    port: int = 0
    load: NodeLoad | None = None  # proto 2 peers from before presence leave it out
    keys_digest: Annotated[str, msgspec.Meta(max_length=64)] = ""  # its API key records (control/replication.py)
    members_digest: Annotated[str, msgspec.Meta(max_length=64)] = ""  # its membership records (members_sync.py)


CatalogEntry = ModelCard  # one model a peer's engines hold: the catalog's one card (``catalog.py``)


class CatalogAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /quorum/v1/catalog``."""

    digest: str = ""
    models: list[ModelCard] = []


class MembersAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /quorum/v1/members``: the membership records (``members.encode_records``) and their digest."""

    digest: Annotated[str, msgspec.Meta(max_length=64)] = ""
    records: msgspec.Raw = msgspec.Raw(b"[]")


class MergeAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """``POST /quorum/v1/members``: how many of the records sent were taken, how many refused."""

    accepted: _Count = 0
    refused: _Count = 0


class JoinRequest(msgspec.Struct, frozen=True, kw_only=True):
    """``POST /quorum/v1/join``: the invite's secret, and the new machine as it describes itself."""

    secret: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
    candidate: Candidate


class JoinAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """The cluster the new machine joined, and its membership records (its own admission among them)."""

    cluster: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    root: _NodeId
    records: msgspec.Raw


class _RawCatalog(msgspec.Struct, frozen=True, kw_only=True):
    """A catalog answer whose entries are decoded one by one (so one bad entry costs only itself)."""

    digest: _Token = ""
    models: list[msgspec.Raw] = []


decode_identity = msgspec.json.Decoder(Identity).decode
_decode_raw_catalog = msgspec.json.Decoder(_RawCatalog).decode
_decode_entry = msgspec.json.Decoder(ModelCard).decode


def decode_catalog(data: bytes, *, max_models: int = MAX_MODELS_PER_PEER, peer: str = "") -> CatalogAnswer:
    """A peer's catalog: its first ``max_models`` entries that are well formed (more: a warning, dropped).

    Raises ``msgspec.ValidationError`` (a ``ValueError``) if the answer itself is not a catalog.
    """
    raw = _decode_raw_catalog(data)
    offered = len(raw.models)
    if offered > max_models:
        log.warning("peer_catalog_capped", peer=peer, offered=offered, kept=max_models)
    models = []
    for entry in raw.models[:max_models]:
        try:
            models.append(_decode_entry(entry))
        except msgspec.ValidationError:
            continue
    return CatalogAnswer(digest=raw.digest, models=models)


# Headers of a request one node forwards to another (over a link that authenticated the sender: the
# peer's TLS certificate on the LAN, its Noise static key through the relay). Never forwarded to an engine.
HOP_HEADER = "X-Quorum-Hop"  # "1": served here, never forwarded on
ORIGIN_HEADER = "X-Quorum-Origin"  # the entry node's id
KEY_HEADER = "X-Quorum-Key"  # the id of the API key the entry node authorised the client with, never the key
AFFINITY_HEADER = "X-Quorum-Affinity"  # the request's conversation key (affinity.py): the same engine is chosen
PEER_HEADERS = (HOP_HEADER, ORIGIN_HEADER, KEY_HEADER, AFFINITY_HEADER)
