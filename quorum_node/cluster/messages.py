"""The peer protocol's messages: what nodes tell each other, as typed Structs decoded once.

The same messages travel over every link (HTTP on the LAN, streams through the
relay). They tolerate unknown fields (a newer peer may say more) and have
defaults for everything a peer may leave out; anything of the wrong shape is a
``msgspec.ValidationError`` where it is decoded, and the peer's answer is
treated as a failed check.
"""

from __future__ import annotations

import msgspec

__all__ = ["CatalogAnswer", "CatalogEntry", "Identity", "decode_catalog", "decode_identity"]


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /quorum/v1/health``: who the node is."""

    node_id: str
    name: str = ""
    fingerprint: str = ""
    proto: int = 1
    catalog_digest: str = ""
    port: int = 0


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
