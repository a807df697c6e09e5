"""The peer protocol's messages: what nodes tell each other, as typed Structs decoded once.

The same messages travel over every link (HTTP on the LAN, streams through the
relay). They tolerate unknown fields (a newer peer may say more) and have
defaults for everything a peer may leave out; anything of the wrong shape is a
``msgspec.ValidationError`` where it is decoded, and the peer's answer is
treated as a failed check.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = ["CatalogAnswer", "CatalogEntry", "EngineLoad", "Identity", "NodeLoad", "decode_catalog", "decode_identity"]

_Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)]
_Name = Annotated[str, msgspec.Meta(max_length=256)]


class EngineLoad(msgspec.Struct, frozen=True, kw_only=True):
    """One engine of a peer, as its health answer tells it (for presence, never for routing)."""

    name: _Name = ""
    kind: _Name = ""
    state: _Name = ""
    load: _Count = 0
    models: _Count = 0


class NodeLoad(msgspec.Struct, frozen=True, kw_only=True):
    """How busy a peer is: requests it is answering, and its engines (absent from older peers)."""

    in_flight: _Count = 0
    engines: Annotated[list[EngineLoad], msgspec.Meta(max_length=256)] = []


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /quorum/v1/health``: who the node is."""

    node_id: str
    name: str = ""
    fingerprint: str = ""
    proto: int = 1
    catalog_digest: str = ""
    port: int = 0
    load: NodeLoad | None = None  # proto 2 peers from before presence leave it out
    keys_digest: Annotated[str, msgspec.Meta(max_length=64)] = ""  # its API key records (control/replication.py)


class CatalogEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One model a peer's engines hold."""

    id: str
    aliases: list[str] = []
    engine: str = ""
    context_length: int | None = None
    loaded: bool | None = None
    owned_by: str = "quorum"
    created: int = 0
    family: str | None = None
    parameter_size: str | None = None
    quantization: str | None = None
    available: bool = True  # False: its engine is down for now (a request for it is 503, not 404)


class CatalogAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /quorum/v1/catalog``."""

    digest: str = ""
    models: list[CatalogEntry] = []


decode_identity = msgspec.json.Decoder(Identity).decode
decode_catalog = msgspec.json.Decoder(CatalogAnswer).decode
