"""API key records, replicated between the nodes of a cluster (no central server).

Anti-entropy over the peer protocol, on every link (LAN HTTP or the relay):

- every health answer carries the node's ``keys_digest`` (a hash over its
  records' ids, versions and signatures); a node that probes a peer and sees a
  digest other than its own pulls the peer's records
  (``GET /quorum/v1/keys``) and merges them. Probes run every
  ``health_interval_s`` (2 s), both ways, so two nodes that can reach each
  other agree within about one interval — a node that was down included, from
  its first probe after it is back;
- a key made or revoked here is pushed at once to every peer that is up
  (``POST /quorum/v1/keys``); and when a peer comes up, each of the two
  pushes what it has to the other and pulls what the other has.

Keys' last uses ride along, unsigned and advisory (``KeysMessage.used``, key
id → epoch seconds, merged by taking the maximum): a pull or a full push
carries them all; and once every ``keys_last_used_sync_s`` (60 s) a node
pushes the ones that changed since the last round (its own and those it
merged, so they also cross a cluster whose nodes do not all reach each other)
to every peer that is up — one small message per peer per interval, and only
when a key was used. Each round also compacts the store (``keys.compactable``).

Every request travels over a link that authenticated both members (mutual TLS,
Noise), and every record carries its own signature by the member that wrote it
(``control.keys``); a record that does not verify is refused.
Merging is a max over a total order in which tombstones win, so the order and
repetition of pulls and pushes do not matter.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

import aiohttp
import msgspec
import structlog

from ..cluster.peers import PeerState
from ..errors import BadRequest, EngineUnavailable
from .keys import MAX_RECORDS, KeyRecord, KeyStore

_KeyId = Annotated[str, msgspec.Meta(pattern=r"^k_[0-9a-f]{12}$")]
_When = Annotated[float, msgspec.Meta(ge=0, le=1e11)]

if TYPE_CHECKING:
    from ..cluster.context import ClusterContext

__all__ = ["KEYS_PATH", "MAX_KEYS_BYTES", "KeyReplicator"]

log = structlog.get_logger(__name__)

KEYS_PATH = "/quorum/v1/keys"
MAX_KEYS_BYTES = 8 * 1024 * 1024  # 10,000 records of ~600 bytes, with room


class KeysMessage(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /quorum/v1/keys`` answer and ``POST /quorum/v1/keys`` body."""

    digest: Annotated[str, msgspec.Meta(max_length=64)] = ""
    records: Annotated[list[KeyRecord], msgspec.Meta(max_length=MAX_RECORDS)] = []
    used: Annotated[dict[_KeyId, _When], msgspec.Meta(max_length=MAX_RECORDS)] = {}  # last uses (advisory)


_decode = msgspec.json.Decoder(KeysMessage).decode
_encode = msgspec.json.Encoder().encode


class KeyReplicator:
    """Keeps ``store`` in agreement with the peers of ``service``."""

    def __init__(self, service: ClusterContext, store: KeyStore) -> None:
        self.service = service
        self.store = store
        self._pulling: set[str] = set()
        # merged records are persisted off the event loop (one write at a time, the latest state wins)
        self._save_soon = service.saver(store.snapshot, store.write, "keys")
        store.on_change.append(self._changed)
        self._pushing = False  # a local change: push once the change handlers are done
        self.used_sync_s = service.settings.keys_last_used_sync_s

    # -- what the cluster service calls -------------------------------------------

    @property
    def digest(self) -> str:
        """A hash over every record this node holds (peers compare theirs in health answers)."""
        return self.store.digest

    def start(self) -> None:
        """Start the rounds of last uses and compaction (owned by the service's tasks)."""
        self.service._spawn(self._rounds(), "keys-rounds")

    def on_peer_digest(self, node_id: str, digest: str) -> None:
        """A peer's health answer told its keys digest: pull if it differs from ours."""
        if digest and digest != self.store.digest and node_id not in self._pulling:
            if self.store.compact():  # maybe it differs only by what one of us forgot already
                self._save_soon()
                if digest == self.store.digest:
                    return
            self._pulling.add(node_id)
            self.service._spawn(self._pull(node_id), "keys-pull")

    def on_peer_up(self, node_id: str) -> None:
        """A peer came (back): give it what we have now, and take what it has (the records it has that we
        lack, and the last uses it heard of while one of us was away)."""
        if self.store.digest:
            self.service._spawn(self._push(node_id), "keys-push")
        if node_id not in self._pulling:
            self._pulling.add(node_id)
            self.service._spawn(self._pull(node_id), "keys-pull")

    def close(self) -> None:
        if self._changed in self.store.on_change:
            self.store.on_change.remove(self._changed)

    # -- the peer endpoint (api/peer.py serves it to members only) ------------------------

    def answer(self) -> bytes:
        """``GET /quorum/v1/keys``: every record, and the last uses this node knows of."""
        return _encode(KeysMessage(digest=self.store.digest, records=self.store.records(), used=self.store.used()))

    def accept(self, raw: bytes, peer: str) -> bytes:
        """``POST /quorum/v1/keys`` from the member ``peer``: merge its records (``BadRequest`` if they are
        not a list of records); the answer says what changed."""
        try:
            message = _decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as e:  # ValidationError included; a string not UTF-8
            raise BadRequest(f"Not a list of key records: {e}", code="bad_key_records") from None
        changed, rejected = self._merge(message.records, peer, message.used)
        return _encode({"digest": self.store.digest, "changed": changed, "rejected": rejected})

    # -- moving records ------------------------------------------------------------------

    def _merge(self, records: list[KeyRecord], peer: str | None, used: dict[str, float]) -> tuple[int, int]:
        self._pushing = True  # changes that came from a peer are not pushed back around the cluster
        try:
            changed, rejected = self.store.merge(records) if records else (0, 0)
        finally:
            self._pushing = False
        if changed:
            log.info("key_records_merged", peer=peer, changed=changed)
            self._save_soon()
        if used:
            self.store.merge_used(used)  # saved with the next round that finds changes (no write per message)
        return changed, rejected

    async def _rounds(self) -> None:
        while True:
            await asyncio.sleep(self.used_sync_s)
            try:
                self._round()
            except Exception:  # task root
                log.exception("keys_round_failed")

    def _round(self) -> None:
        """One round: forget what may be forgotten; push the last uses that changed to the peers up."""
        dirty = self.store.compact() > 0
        changes = self.store.take_used_changes()
        if changes:
            dirty = True
            data = _encode(KeysMessage(digest=self.store.digest, used=changes))
            for p in self.service.table.all():
                if p.state is PeerState.UP:
                    self.service._spawn(self._push(p.node_id, data), "keys-used-push")
        if dirty:
            self._save_soon()

    def _changed(self) -> None:
        if self._pushing:
            return
        for p in self.service.table.all():
            if p.state is PeerState.UP:
                self.service._spawn(self._push(p.node_id), "keys-push")

    def _link(self, node_id: str) -> Any:
        peer = self.service.table.get(node_id)
        links = self.service.links(peer) if peer is not None else []
        return links[0] if links else None

    async def _pull(self, node_id: str) -> None:
        try:
            link = self._link(node_id)
            if link is None:
                return
            message = _decode(await self.service._get(link, KEYS_PATH, node_id, 5.0))
            self._merge(message.records, node_id, message.used)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, EngineUnavailable) as e:
            log.warning("keys_pull_failed", peer=node_id, error=str(e))
        finally:
            self._pulling.discard(node_id)

    async def _push(self, node_id: str, data: bytes | None = None) -> None:
        """POST ``data`` (default: every record and every last use) to the peer ``node_id``."""
        svc = self.service
        link = self._link(node_id)
        if link is None:
            return
        if data is None:
            data = _encode(KeysMessage(digest=self.store.digest, records=self.store.records(), used=self.store.used()))
        await svc._post(link, KEYS_PATH, data, node_id, "keys")
