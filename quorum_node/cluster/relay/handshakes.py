"""Noise handshakes with peers through the relay, and introductions (pure logic; part of ``protocol.py``).

To each peer that membership says is a member (``peer_key``) a node talks
through an end-to-end Noise session (``noise.py``, ``Noise_IK``: the initiator
knows the responder's static X25519 key from membership; the responder learns
the initiator's from message 1 and accepts only the key membership has for
the id the relay says the hello came from; both node ids and the initiator's
relay session are bound into the prologue), so the relay forwards frames it
cannot read, and a node serves only members, each request as the member its
session authenticated. Nobody else gets a session: a cluster secret grants
nothing here.

**Introductions** (as on the LAN, ``members_sync``): a member admitted a
moment ago by another is not known yet to every member. A responder that does
not know the initiator answers its hello with an empty ``HelloReply`` (a
refusal); the initiator's next hello then carries ``introduction()`` (its
membership records, encrypted to the responder like all of message 1), which
the responder hands to ``introduce(peer_id, records)`` (merge them: each must
verify, signed by a member) before it checks membership again. At most one
introduction per peer every ``INTRODUCE_EVERY_S``.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import structlog

from ..identity import NodeIdentity
from ..noise import Handshake, NoiseError
from .messages import FEATURES, HANDSHAKE_TIMEOUT_S, INTRODUCE_EVERY_S, decode_features, encode
from .sessions import Presence, Session, numbered, prologue
from .streams import Outgoing

if TYPE_CHECKING:
    from .streams import Listener

__all__ = ["Handshakes"]

log = structlog.get_logger(__name__)

_WARNED_MAX = 32  # peers whose refused handshake we log (one line each; past it, only counted)
_FEATURES = encode(FEATURES)


class Handshakes:
    """The handshakes of one node over its relay connection; ``sessions`` and ``presence`` are the protocol's.

    ``end_session(peer, why, retry)`` and ``joined(peer, since)`` are the
    protocol's: a failed or replaced session fails its streams; a stranger that
    an introduction made a member comes online.
    """

    def __init__(
        self,
        *,
        identity: NodeIdentity,
        peer_key: Callable[[str], bytes | None],
        sessions: dict[str, Session],
        presence: Presence,
        listener: Listener,
        push: Callable[[Outgoing], None],
        end_session: Callable[[str, str, bool], None],
        joined: Callable[[str, float], None],
        introduction: Callable[[], bytes] | None,
        introduce: Callable[[str, bytes], object] | None,
    ) -> None:
        self.node_id = identity.node_id
        self._identity = identity
        self._peer_key = peer_key
        self._sessions = sessions
        self._presence = presence
        self._listener = listener
        self._push = push
        self._end_session = end_session
        self._joined = joined
        self._introduction = introduction
        self._introduce = introduce
        self.refused_hellos = 0  # hellos from non-members, or with a key that is not the member's
        self.pending: dict[str, float] = {}  # peer -> when our unanswered hello expires
        self._warned: set[str] = set()  # peers whose refused handshake was logged
        self._introduce_to: set[str] = set()  # peers that did not know us: our next hello introduces us
        self._heard: dict[str, tuple[float, float]] = {}  # stranger -> (tokens, when) of its introductions

    def start(
        self, peer: str, key: bytes, session_id: str, opened_after: int, now: float, max_frame_bytes: int
    ) -> None:
        """Say hello to the member ``peer`` (whose key is ``key``): a session, waiting for its reply."""
        session = Session(opened_after)
        session.initiator = True
        session.handshake = Handshake(
            initiator=True,
            static=self._identity.dh_private,
            remote_static=key,
            prologue=prologue(self.node_id, peer, session_id),
        )
        self._sessions[peer] = session
        features = _FEATURES  # what we read, told inside the encryption
        if peer in self._introduce_to and self._introduction is not None:
            self._introduce_to.discard(peer)
            features = self._with_introduction(max_frame_bytes)
            session.introduced = True
        message = session.handshake.write_message(features)
        self._push(("hello", peer, session_id.encode() + b"\x00" + message))
        self.pending[peer] = now + HANDSHAKE_TIMEOUT_S

    def _with_introduction(self, max_frame_bytes: int) -> bytes:
        assert self._introduction is not None
        records = self._introduction()
        if len(records) > max_frame_bytes // 2:  # it would not pass the relay: go without
            log.warning("relay_introduction_too_large", size=len(records), max_frame_bytes=max_frame_bytes)
            return _FEATURES
        return encode(msgspec.structs.replace(FEATURES, intro=records))

    def _refuse(self, peer: str, why: str) -> None:
        """Refuse ``peer``'s hello, and say so (an empty ``HelloReply``: one small frame, no crypto), so that
        it does not wait for an answer (a member not known here yet introduces itself in its next hello)."""
        self.refused_hellos += 1
        if peer not in self._warned and len(self._warned) < _WARNED_MAX:  # once a peer: a flood logs nothing more
            self._warned.add(peer)
            log.warning("relay_handshake_refused", peer=peer, reason=why)
        self._push(("hello_reply", peer, b""))

    def _may_hear(self, peer: str, now: float) -> bool:
        """Whether to read a hello of ``peer``, online but no member (yet), for its introduction: within a
        budget per peer (two, then one every ``INTRODUCE_EVERY_S``), so a stranger's flood costs no crypto."""
        if peer not in self._presence.strangers:
            return False
        if len(self._heard) > 4 * self._presence.max_peers:
            self._heard.clear()
        tokens, at = self._heard.get(peer, (2.0, now))
        tokens = min(2.0, tokens + (now - at) / INTRODUCE_EVERY_S)
        if tokens < 1:
            return False
        self._heard[peer] = (tokens - 1, now)
        return True

    def _introduced(self, peer: str, records: bytes) -> bytes | None:
        """Take ``peer``'s introduction (its membership records); its key if that made it a member we track."""
        if not records or self._introduce is None:
            return None
        try:
            self._introduce(peer, records)
        except Exception as e:  # noqa: BLE001  (their records, our membership's verdict: nothing learnt from what fails)
            log.warning("relay_introduction_failed", peer=peer, error=str(e))
            return None
        key = self._peer_key(peer)
        if key is None:
            return None
        log.info("relay_peer_introduced", peer=peer)
        online = self._presence.members
        since = self._presence.strangers.get(peer)
        if peer not in online and since is not None:  # (membership may have told us already)
            self._joined(peer, since)
        return key if peer in online else None

    def on_hello(self, peer: str, payload: bytes, opened_after: int, now: float) -> None:
        expected = self._peer_key(peer)
        if expected is None and (self._introduce is None or not self._may_hear(peer, now)):
            self._refuse(peer, "not a member")  # a stranger (past its budget): no crypto at all
            return
        if expected is not None and peer not in self._presence.members:  # a member we do not track (max_peers)
            self._refuse(peer, "not tracked (max_peers)")
            return
        existing = self._sessions.get(peer)
        pending = existing is not None and existing.initiator and not existing.ready
        if pending and self.node_id < peer:
            return  # both said hello at once: the lower id's handshake wins
        sep = payload.find(b"\x00")
        if sep <= 0 or sep > 64:
            log.warning("relay_bad_hello", peer=peer)
            return
        their_session, message = payload[:sep].decode(errors="replace"), payload[sep + 1 :]
        hs = Handshake(
            initiator=False, static=self._identity.dh_private, prologue=prologue(peer, self.node_id, their_session)
        )
        try:
            theirs = decode_features(hs.read_message(message))
            if expected is None:  # a stranger: a member only if its introduction makes it one
                expected = self._introduced(peer, theirs.intro)
                if expected is None:
                    self._refuse(peer, "not a member")
                    return
            # The relay says who sent it; its static key says who wrote it: they must be the same member.
            if hs.remote_static is None or not hmac.compare_digest(hs.remote_static, expected):
                self._refuse(peer, "its key is not the member's")
                return
            reply = hs.write_message(_FEATURES)
        except NoiseError as e:
            log.warning("relay_handshake_failed", peer=peer, error=str(e))
            return
        if existing is not None and pending:
            session = existing  # ours lost the tie: whoever waits on it gets this one
        else:
            if existing is not None:
                self._end_session(peer, "the peer started a new session", False)
            session = Session(opened_after)
            self._sessions[peer] = session
        session.initiator = False
        session.handshake = None
        self.pending.pop(peer, None)
        session.learn(theirs)
        session.send, session.recv = numbered(hs)
        self._push(("hello_reply", peer, reply))
        self._listener.session_ready(peer)

    def on_hello_reply(self, peer: str, payload: bytes) -> None:
        session = self._sessions.get(peer)
        if session is None or session.handshake is None or session.ready:
            return
        if not payload:  # refused: it does not take us for a member (yet)
            if (
                not session.introduced
                and self._introduction is not None
                and len(self._introduce_to) < self._presence.max_peers
            ):
                self._introduce_to.add(peer)  # our next hello introduces us; what waits is asked again in it
                self._end_session(peer, "the peer does not know us yet", True)
            else:
                log.warning("relay_handshake_refused_by_peer", peer=peer)
                self._end_session(peer, "the peer refused our handshake (it does not take us for a member)", False)
            return
        try:  # it opens only for the holder of the key we expected (IK: the reply mixes ``es`` and ``se``)
            session.learn(decode_features(session.handshake.read_message(payload)))
            session.send, session.recv = numbered(session.handshake)
        except NoiseError as e:
            log.warning("relay_handshake_failed", peer=peer, error=str(e))
            self._end_session(peer, f"handshake failed: {e}", False)
            return
        session.handshake = None
        self.pending.pop(peer, None)
        self._listener.session_ready(peer)
