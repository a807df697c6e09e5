"""Membership records, agreed between the nodes the way API keys are (``control/replication.py``).

- Every health answer carries the node's ``members_digest``; a node that
  probes a peer and sees another digest pulls its records
  (``GET /quorum/v1/members``) and merges them (``members.MemberStore.merge``:
  each record must verify, signed by a member). Probes run every
  ``health_interval_s`` (2 s) both ways, so a node that was down learns of a
  removal within a probe or two of its return.
- A change made here (an admission, a removal) is pushed at once to every peer
  that is up (``POST /quorum/v1/members``), and saved to ``members.json``.
- **Introductions.** A member's TLS handshake fails at a node that does not
  know it yet (it was admitted by another member a moment ago). So a node whose
  probe of a member failed sends that member its records once in a while,
  over a connection that proves the *server* is that member but presents no
  certificate of its own (``introduce_soon``). The server takes them like any
  records — each must verify, signed by a member — and answers with counts
  only: nothing of the cluster is told to an unauthenticated caller.

``RecordSigner`` signs this node's API key records with its key and checks
the others' against membership (``control/keys.py``).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
import structlog

from ..errors import BadRequest, EngineUnavailable, RateLimited
from .identity import NodeIdentity, verify_signature
from .members import MemberStore, decode_records, encode_records
from .membership import save_member_records
from .messages import MembersAnswer, MergeAnswer
from .peers import PeerState
from .tls import certless_client, peer_cert_id

if TYPE_CHECKING:
    from .context import ClusterContext

__all__ = ["MAX_MEMBERS_BYTES", "MEMBERS_PATH", "MemberReplicator", "RecordSigner"]

log = structlog.get_logger(__name__)

MEMBERS_PATH = "/quorum/v1/members"
MAX_MEMBERS_BYTES = 4 * 1024 * 1024  # 4,096 records of about 700 bytes, with room
INTRODUCE_EVERY_S = 5.0
INTRODUCTIONS_PER_S = 5.0  # unauthenticated introductions taken, node-wide
MAX_NEW_INTRODUCED = 64  # records an introduction may bring that this node does not hold yet
_encode = msgspec.json.Encoder().encode


_decode_answer = msgspec.json.Decoder(MembersAnswer).decode


class RecordSigner:
    """Signs with this node's key; verifies a record's origin against membership (``control.keys.RecordSigner``)."""

    def __init__(self, identity: NodeIdentity, members: MemberStore | None) -> None:
        self.identity = identity
        self.members = members
        self.origin = identity.node_id

    def sign(self, data: bytes) -> bytes:
        return self.identity.sign(data)

    def verify(self, origin: str, data: bytes, signature: bytes, *, current: bool) -> bool:
        if origin == self.identity.node_id:
            key = self.identity.sign_key
        elif self.members is None:
            return False
        else:
            member = self.members.get(origin) if current else self.members.known(origin)
            if member is None:
                return False
            key = member.sign_key
        return verify_signature(key, data, signature)


class MemberReplicator:
    """Keeps the service's ``MemberStore`` in agreement with its peers, and on disk."""

    def __init__(self, service: ClusterContext) -> None:
        self.service = service
        self.store = service.members
        self._pulling: set[str] = set()
        self._introduced: dict[str, float] = {}  # node id -> when we last introduced ourselves
        data_dir = Path(service.settings.data_dir)
        self._save_soon = service.saver(
            lambda: encode_records(self.store.records()), lambda data: save_member_records(data_dir, data), "members"
        )
        self._from_peer = False  # a change that came from a peer is not pushed back around
        self._next_introduction = 0.0

    def start(self) -> None:
        self.store.on_change.append(self._changed)

    # -- what the service calls ---------------------------------------------------------

    def on_peer_digest(self, node_id: str, digest: str) -> None:
        if digest and digest != self.store.digest and node_id not in self._pulling:
            self._pulling.add(node_id)
            self.service._spawn(self._pull(node_id), "members-pull")

    def introduce_soon(self, node_id: str | None, address: str) -> None:
        """Our records to whoever answers at ``address`` — once it proved it is a member (``node_id``, or any
        member when its id is not known yet) — at most every few seconds per address."""
        now = time.monotonic()
        if now - self._introduced.get(address, -1e9) < INTRODUCE_EVERY_S:
            return
        if len(self._introduced) > 4 * self.service.table.max_peers:
            self._introduced.clear()
        self._introduced[address] = now
        self.service._spawn(self._introduce(node_id, address), "members-introduce")

    def merge(self, raw: bytes, peer: str | None, *, max_new: int | None = None) -> tuple[int, int]:
        """Merge a JSON list of records (ValueError if it is not one); ``max_new``: see ``MemberStore.merge``."""
        records = decode_records(raw)
        self._from_peer = True
        try:
            accepted, refused = self.store.merge(records, max_new=max_new)
        finally:
            self._from_peer = False
        if accepted:
            log.info("member_records_merged", peer=peer, accepted=accepted, members=len(self.store))
        if refused:
            log.warning("member_records_refused", peer=peer, refused=refused)
        return accepted, refused

    # -- the peer endpoint (api/peer.py) --------------------------------------------------

    def answer(self) -> bytes:
        """``GET /quorum/v1/members``: the digest and every record."""
        records = msgspec.Raw(encode_records(self.store.records()))
        return _encode(MembersAnswer(digest=self.store.digest, records=records))

    def accept(self, raw: bytes, member: str | None, remote: str | None) -> bytes:
        """``POST /quorum/v1/members``: a member's push, or (``member`` None) an introduction on the peer
        port from a node without a certificate yet. The records speak for themselves (each must verify);
        an introduction's cost is bounded (rate, new records) and its answer says nothing but counts."""
        if member is None:  # nobody vouches for the sender
            now = time.monotonic()
            if now < self._next_introduction:
                raise RateLimited("Introductions are taken a few times a second; retry in a moment", retry_after_s=1)
            self._next_introduction = now + 1.0 / INTRODUCTIONS_PER_S
        try:
            accepted, refused = self.merge(
                raw, member or f"introduced by {remote}", max_new=None if member else MAX_NEW_INTRODUCED
            )
        except ValueError as e:  # msgspec's DecodeError / ValidationError
            raise BadRequest(f"Not a list of membership records: {e}", code="bad_member_records") from None
        return _encode(MergeAnswer(accepted=accepted, refused=refused))

    # -- moving records ----------------------------------------------------------------------

    def _changed(self) -> None:
        self._save_soon()
        if self._from_peer:
            return
        for p in self.service.table.all():
            if p.state is PeerState.UP:
                self.service._spawn(self._push(p.node_id), "members-push")

    async def _pull(self, node_id: str) -> None:
        try:
            peer = self.service.table.get(node_id)
            links = self.service.links(peer) if peer is not None else []
            if not links:
                return
            answer = _decode_answer(await self.service._get(links[0], MEMBERS_PATH, node_id, 5.0))
            self.merge(bytes(answer.records), node_id)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, EngineUnavailable) as e:
            log.warning("members_pull_failed", peer=node_id, error=str(e))
        finally:
            self._pulling.discard(node_id)

    async def _push(self, node_id: str) -> None:
        svc = self.service
        peer = svc.table.get(node_id)
        links = svc.links(peer) if peer is not None else []
        if not links:
            return
        await self._post(links[0], node_id)

    async def _post(self, link: Any, node_id: str) -> bool:
        return await self.service._post(link, MEMBERS_PATH, encode_records(self.store.records()), node_id, "members")

    async def _introduce(self, node_id: str | None, address: str) -> None:
        """Our records to the member at ``address``, presenting no certificate (it may not know ours yet)."""
        from .links import HttpLink

        svc = self.service
        if node_id is None:  # a static address: see whose certificate answers there first, sending nothing
            node_id = await _certificate_at(address)
        if node_id is None or node_id == svc.node_id:
            return
        member = self.store.get(node_id)
        if member is None:
            return
        if await self._post(HttpLink(svc.session, address, certless_client(member.cert)), node_id):
            log.info("members_introduced", peer=node_id, address=address)
            svc.probe_soon(address, node_id)  # it knows us now: no need to wait for the next round


async def _certificate_at(address: str, timeout_s: float = 3.0) -> str | None:
    """The node id of the certificate the TLS server at ``address`` presents (a handshake, nothing sent)."""
    host, _, port = address.rpartition(":")
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host.strip("[]"), int(port), ssl=certless_client(None))
            return peer_cert_id(writer.get_extra_info("ssl_object"))
    except (OSError, TimeoutError, ValueError) as e:
        log.debug("peer_certificate_unknown", address=address, error=str(e))
        return None
    finally:
        if writer is not None:
            writer.close()
