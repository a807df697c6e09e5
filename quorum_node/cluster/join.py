"""Joining: a new machine with a one-time invite becomes a member.

``quorum-node invite`` on a member prints a token (``membership.InviteToken``):
the inviter's node id, 32 random bytes, and the addresses of its peer port.
Only the SHA-256 of the random bytes is stored (``invites.json``), until it is
used or expires.

``quorum-node join TOKEN`` on the new machine (``join``):

1. connects over TLS to one of the token's addresses, presenting no
   certificate, and goes on only if the server's certificate is the key the
   token's node id names (so the token goes to the inviter, nobody else);
2. sends ``JoinRequest``: the secret and what it says of itself
   (``Candidate``: its public keys and certificate, signed by its own key);
3. the inviter (``JoinHandler``) uses the invite (once; expired or used ones
   are refused alike), admits the candidate with a record it signs, pushes
   that to its peers, and answers with the cluster's name, root and every
   membership record;
4. the new machine checks that the records verify and make it a member, and
   stores them. Its node then finds the others (mDNS, static peers, the relay)
   and introduces itself to any that has not heard of it yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from quorum_relay import wire

from ..errors import ApiError, BadRequest, Forbidden
from .codes import (
    CODE_FINISH_PATH,
    CODE_START_PATH,
    MAX_CODE_BYTES,
    RELAY_ANSWER,
    RELAY_CANDIDATE,
    CodeError,
    CodeFinish,
    CodeInvites,
    CodeStart,
    Joiner,
    RelayAsk,
    RelayJoin,
    RelayJoined,
    RelayRefused,
    RelayStart,
    RelayStarted,
    SealedJoin,
    open_sealed,
    seal,
)
from .identity import NodeIdentity
from .members import Candidate, MemberStore, decode_records, encode_records
from .membership import (
    Cluster,
    InviteToken,
    load_cluster,
    load_member_records,
    parse_invite,
    store_cluster,
    store_relay,
    take_invite,
)
from .messages import JoinAnswer, JoinRequest
from .tls import certless_client, peer_cert_id

if TYPE_CHECKING:
    from .context import ClusterContext

__all__ = [
    "CONFIRM_S",
    "JOIN_PATH",
    "MAX_JOIN_BYTES",
    "Asking",
    "JoinError",
    "JoinHandler",
    "join",
    "join_by_relay",
    "token_for_code",
]

log = structlog.get_logger(__name__)

JOIN_PATH = "/quorum/v1/join"
MAX_JOIN_BYTES = 16 * 1024
_MAX_ANSWER_BYTES = 8 * 1024 * 1024


_decode_request = msgspec.json.Decoder(JoinRequest).decode
_decode_answer = msgspec.json.Decoder(JoinAnswer).decode
_decode_relay_ask = msgspec.json.Decoder(RelayAsk).decode
_decode_relay_answer = msgspec.json.Decoder(RelayStarted | RelayJoined | RelayRefused).decode
_decode_candidate = msgspec.json.Decoder(Candidate).decode
_decode_sealed_join = msgspec.json.Decoder(SealedJoin).decode
_encode = msgspec.json.Encoder().encode


class JoinError(Exception):
    """Joining failed; the message says why (never the token)."""


#: How long a machine whose invite asks for confirmation waits for the inviter's answer.
CONFIRM_S = 120.0
#: Machines waiting for a confirmation at once (more are refused).
_ASKING = 16


class Asking(msgspec.Struct, frozen=True, kw_only=True):
    """A machine that used an invite made with ``--admit``, waiting for the inviter (``GET
    /quorum/admin/joins``): who it says it is, and which invite it used (a prefix of its hash)."""

    id: str
    name: str
    node_id: str
    invite: str
    remote: str | None
    waiting_s: float


class JoinHandler:
    """``POST /quorum/v1/join`` on the peer port (the trust middleware lets it through without a certificate)."""

    def __init__(self, service: ClusterContext, codes: CodeInvites) -> None:
        self.service = service
        self.codes = codes
        self._asking: dict[str, tuple[Asking, float, asyncio.Future[bool]]] = {}

    def asking(self) -> list[Asking]:
        """The machines waiting for the inviter to confirm them, oldest first."""
        now = time.monotonic()
        return [msgspec.structs.replace(a, waiting_s=round(now - at, 1)) for a, at, _ in self._asking.values()]

    def decide(self, asking_id: str, admit: bool) -> bool:
        """The inviter's answer for a waiting machine; False where none such waits (any more)."""
        waiting = self._asking.get(asking_id)
        if waiting is None or waiting[2].done():
            return False
        waiting[2].set_result(admit)
        return True

    async def _confirmed(self, candidate: Candidate, secret_hash: str, remote: str | None) -> bool:
        if len(self._asking) >= _ASKING:
            return False
        asking = Asking(
            id=secrets.token_hex(8),
            name=candidate.name,
            node_id=candidate.node_id,
            invite=secret_hash[:12],
            remote=remote,
            waiting_s=0.0,
        )
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._asking[asking.id] = (asking, time.monotonic(), answer)
        log.info("join_waiting_for_confirmation", candidate=candidate.node_id, name=candidate.name, remote=remote)
        try:
            async with asyncio.timeout(CONFIRM_S):
                return await answer
        except TimeoutError:
            return False
        finally:
            del self._asking[asking.id]

    async def admit(self, raw: bytes, remote: str | None) -> bytes:
        """``POST /quorum/v1/join`` (api/peer.py takes it on the peer port only): a new machine with an
        invite. The invite is spent, the candidate admitted; the answer is the cluster and its records."""
        svc = self.service
        try:
            ask = _decode_request(raw)
            ask.candidate.check()
        except ValueError as e:  # msgspec's errors are ValueErrors
            raise BadRequest(f"Not a join request: {e}", code="bad_join") from None
        secret_hash = hashlib.sha256(ask.secret).hexdigest()
        outcome = await asyncio.to_thread(
            take_invite,
            Path(svc.settings.data_dir),  # a locked, fsynced file
            secret_hash,
            time.time(),
        )
        if outcome not in ("ok", "confirm"):
            log.warning("join_refused", remote=remote, candidate=ask.candidate.node_id, reason=outcome)
            raise Forbidden(
                "This invite is not valid (unknown, used or expired): ask for a new one",
                code="invite_invalid",
                retryable=False,
            )
        if outcome == "confirm" and not await self._confirmed(ask.candidate, secret_hash, remote):
            log.warning("join_declined", remote=remote, candidate=ask.candidate.node_id)
            raise Forbidden(
                "The inviter did not confirm this machine (declined, or no answer in time): ask for a new invite",
                code="join_declined",
                retryable=False,
            )
        try:
            svc.members.admit(svc.identity, ask.candidate, time.time())
        except ValueError as e:
            raise ApiError(
                f"Cannot admit this node: {e}", status=409, type_="invalid_request_error", code="join_refused"
            ) from None
        log.info("member_admitted", node_id=ask.candidate.node_id, name=ask.candidate.name, remote=remote)
        records = msgspec.Raw(encode_records(svc.members.records()))
        return _encode(JoinAnswer(cluster=svc.membership.name, root=svc.membership.root, records=records))

    async def rendezvous(self, nameplate: int, raw: bytes) -> bytes:
        """A machine with a join code, through the relay (``codes.py``): ``RelayStart`` → ``RelayStarted``;
        ``RelayJoin`` → the candidate admitted as a token join would admit it → ``RelayJoined``. Anything
        wrong → ``RelayRefused`` (a wrong proof costs the invitation a guess, as on the LAN)."""
        svc = self.service

        def refused(status: int, message: str) -> bytes:
            return _encode(RelayRefused(status=status, message=message[:512]))

        try:
            ask = _decode_relay_ask(raw)
        except ValueError as e:
            return refused(400, f"not a join code message: {e}")
        if ask.nameplate != nameplate:
            return refused(400, "the message names another invitation")
        try:
            if isinstance(ask, RelayStart):
                session, message = self.codes.start(ask.nameplate, ask.message)
                return _encode(RelayStarted(session=session, message=message))
            key, token = self.codes.prove(ask.nameplate, ask.session, ask.proof)
        except CodeError as e:
            log.info("join_code_refused", via="relay", nameplate=nameplate, status=e.status)
            return refused(e.status, e.message)
        plain = open_sealed(key, RELAY_CANDIDATE, ask.candidate)
        if plain is None:
            return refused(400, "the candidate does not open with this exchange's key")
        try:
            candidate = _decode_candidate(plain)
            request = _encode(JoinRequest(secret=parse_invite(token).secret, candidate=candidate))
            answer = await self.admit(request, remote="relay")
        except ValueError as e:
            return refused(400, f"not a candidate: {e}")
        except ApiError as e:
            return refused(e.status, e.message)
        s = svc.settings
        joined = SealedJoin(
            answer=msgspec.Raw(answer), inviter=svc.node_id, relay=s.relay or "", relay_token=s.relay_token or ""
        )
        return _encode(RelayJoined(sealed=seal(key, RELAY_ANSWER, _encode(joined))))


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise JoinError(f"bad address {address!r} in the invite")
    return host.strip("[]"), int(port)


def join(
    data_dir: Path,
    identity: NodeIdentity,
    token: InviteToken,
    name: str,
    *,
    via: str | None = None,
    timeout_s: float = 10.0,
    force: bool = False,
    on_wait: Callable[[], None] | None = None,
) -> tuple[Cluster, MemberStore]:
    """Join the cluster ``token`` invites to, as ``identity`` named ``name``; store the membership.
    ``on_wait`` is called if the inviter's answer takes over a second (it may be asking its user)."""
    _not_elsewhere(data_dir, token.inviter, force)
    ctx = certless_client(None)  # the server's certificate is checked below, by the key the token names
    body = _encode(JoinRequest(secret=token.secret, candidate=Candidate.of(identity, name)))
    errors: list[str] = []
    for address in [via] if via else list(token.addresses):
        host, port = _split(address)
        conn = http.client.HTTPSConnection(host, port, timeout=timeout_s, context=ctx)
        try:
            conn.connect()
            sock = conn.sock
            served_by = peer_cert_id(sock) if isinstance(sock, ssl.SSLSocket) else None
            if served_by != token.inviter:
                errors.append(f"{address}: the node there is not the inviter")
                continue
            conn.request("POST", JOIN_PATH, body=body, headers={"Content-Type": "application/json"})
            sock.settimeout(CONFIRM_S + timeout_s)  # the inviter may be asked to confirm this machine
            with _after(1.0, on_wait):
                resp = conn.getresponse()
                raw = resp.read(_MAX_ANSWER_BYTES + 1)
        except (OSError, http.client.HTTPException) as e:
            errors.append(f"{address}: {e}")
            continue
        finally:
            conn.close()
        if resp.status != 200:
            try:
                message = msgspec.json.decode(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {resp.status}"
            raise JoinError(f"the inviter refused: {message}")
        if len(raw) > _MAX_ANSWER_BYTES:
            raise JoinError("the inviter's answer is too large")
        return _accept(data_dir, identity, raw, token.inviter, force)
    raise JoinError("could not reach the inviter: " + "; ".join(errors) if errors else "the invite names no address")


@contextlib.contextmanager
def _after(delay_s: float, call: Callable[[], None] | None) -> Iterator[None]:
    """Call ``call`` (from a timer thread) if the block is still running after ``delay_s``."""
    timer = threading.Timer(delay_s, call) if call is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()


def _not_elsewhere(data_dir: Path, inviter: str | None, force: bool) -> None:
    """Refuse (before an invite is spent) to join where this node is in another cluster already."""
    existing = load_cluster(data_dir)
    if existing is None or force:
        return
    held = MemberStore(existing.root, decode_records(load_member_records(data_dir)))
    if inviter is None or held.known(inviter) is None:
        raise FileExistsError(
            f"this node already belongs to cluster {existing.name!r} (root {existing.root}); "
            "leave it first (`quorum-node cluster leave`) or pass --force"
        )


def _accept(
    data_dir: Path, identity: NodeIdentity, raw: bytes, inviter: str, force: bool
) -> tuple[Cluster, MemberStore]:
    """The inviter's ``JoinAnswer``, checked (its records make this node and the inviter members) and stored."""
    try:
        answer = _decode_answer(raw)
        store = MemberStore(answer.root, decode_records(bytes(answer.records)))
    except ValueError as e:
        raise JoinError(f"the inviter's answer is malformed: {e}") from None
    if not store.is_member(identity.node_id) or not store.is_member(inviter):
        raise JoinError("the inviter's records do not make this node a member")
    cluster = Cluster(name=answer.cluster, root=answer.root)
    try:
        store_cluster(data_dir, cluster, encode_records(store.records()), force=force)
    except ValueError as e:
        raise JoinError(str(e)) from None
    return cluster, store


def join_by_relay(
    data_dir: Path,
    identity: NodeIdentity,
    code: str,
    relay_url: str,
    name: str,
    *,
    timeout_s: float = 10.0,
    force: bool = False,
    on_wait: Callable[[], None] | None = None,
) -> tuple[Cluster, MemberStore, str]:
    """Join with a short code through the relay it names (``codes.py``): SPAKE2 with the inviter over the
    relay's ``/v1/join/<nameplate>``, this node's candidate and the inviter's answer sealed under its key.
    Stores the membership and the relay (``store_relay``: the node reaches the cluster through it); returns
    them and the relay's URL."""
    from websockets.exceptions import InvalidStatus, WebSocketException
    from websockets.sync.client import connect

    _not_elsewhere(data_dir, None, force)
    joiner = Joiner(code)
    url = relay_url.rstrip("/") + wire.JOIN_PATH + str(joiner.nameplate)

    def said(ws: Any, wait_s: float = timeout_s) -> RelayStarted | RelayJoined:
        raw = ws.recv(timeout=wait_s)
        if not isinstance(raw, bytes):
            raise JoinError("the relay sent text")
        try:
            answer: RelayStarted | RelayJoined | RelayRefused = _decode_relay_answer(raw)
        except ValueError as e:
            raise JoinError(f"the inviter's answer is malformed: {e}") from None
        if isinstance(answer, RelayRefused):
            raise JoinError(f"the inviter refused: {answer.message}")
        return answer

    try:
        with connect(
            url, open_timeout=timeout_s, close_timeout=2, max_size=_MAX_ANSWER_BYTES, compression=None, proxy=None
        ) as ws:
            ws.send(_encode(RelayStart(nameplate=joiner.nameplate, message=joiner.message)))
            started = said(ws)
            if not isinstance(started, RelayStarted):
                raise JoinError("the inviter's answer is out of order")
            joiner.key_from(started.message)
            candidate = joiner.seal(RELAY_CANDIDATE, _encode(Candidate.of(identity, name)))
            proof = joiner.proof()
            ws.send(
                _encode(
                    RelayJoin(nameplate=joiner.nameplate, session=started.session, proof=proof, candidate=candidate)
                )
            )
            with _after(1.0, on_wait):  # the inviter may be asked to confirm this machine
                joined = said(ws, CONFIRM_S + timeout_s)
            if not isinstance(joined, RelayJoined):
                raise JoinError("the inviter's answer is out of order")
    except InvalidStatus as e:
        status = e.response.status_code
        raise JoinError(
            f"{relay_url}: no invitation {joiner.nameplate} there (used, burnt or expired?)"
            if status == 404
            else f"{relay_url} refused: HTTP {status}"
        ) from None
    except TimeoutError:
        raise JoinError(f"{relay_url}: the inviter did not answer in {timeout_s:.0f} s") from None
    except (OSError, WebSocketException) as e:
        raise JoinError(f"{relay_url}: {e}") from None
    plain = joiner.open(RELAY_ANSWER, joined.sealed)
    if plain is None:
        raise JoinError("the inviter's answer does not open with this code")
    try:
        sealed = _decode_sealed_join(plain)
    except ValueError as e:
        raise JoinError(f"the inviter's answer is malformed: {e}") from None
    cluster, store = _accept(data_dir, identity, bytes(sealed.answer), sealed.inviter, force)
    relay = sealed.relay or relay_url
    store_relay(data_dir, relay, sealed.relay_token)
    return cluster, store, relay


def _post_json(address: str, path: str, body: bytes, timeout_s: float) -> tuple[int, bytes]:
    """POST ``body`` to ``address``'s peer port over TLS with no certificate of ours, checking none of its:
    what authenticates a code exchange is the code (SPAKE2), not the connection."""
    host, port = _split(address)
    conn = http.client.HTTPSConnection(host, port, timeout=timeout_s, context=certless_client(None))
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read(MAX_CODE_BYTES + 1)
    finally:
        conn.close()


def _refusal(raw: bytes, status: int) -> str:
    try:
        return str(msgspec.json.decode(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}"


def token_for_code(code: str, addresses: list[str], *, timeout_s: float = 10.0) -> tuple[str, str]:
    """The invite token a short code stands for, and the address of the inviter that gave it
    (``codes.py``): asks each of ``addresses`` for the code's invitation, and runs SPAKE2 with the one that
    has it. ``JoinError`` where none has it, or the code is wrong (each wrong try costs the invitation one)."""
    joiner = Joiner(code)
    start = _encode(CodeStart(nameplate=joiner.nameplate, message=joiner.message))
    errors: list[str] = []
    for address in addresses:
        try:
            status, raw = _post_json(address, CODE_START_PATH, start, timeout_s)
        except (OSError, http.client.HTTPException, ValueError) as e:
            errors.append(f"{address}: {e}")
            continue
        if status == 404:
            errors.append(f"{address}: no invitation {joiner.nameplate} there")
            continue
        if status != 200:
            raise JoinError(f"{address} refused: {_refusal(raw, status)}")
        try:
            started = msgspec.json.decode(raw, type=_CodeStarted)
            joiner.key_from(started.message)
            finish = CodeFinish(nameplate=joiner.nameplate, session=started.session, proof=joiner.proof())
            status, raw = _post_json(address, CODE_FINISH_PATH, _encode(finish), timeout_s)
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise JoinError(f"{address}: the exchange broke off: {e}") from None
        if status != 200:
            raise JoinError(f"the inviter refused: {_refusal(raw, status)}")
        try:
            sealed = msgspec.json.decode(raw, type=_CodeFinished).token
        except ValueError as e:
            raise JoinError(f"the inviter's answer is malformed: {e}") from None
        token = joiner.token(sealed)
        if token is None:
            raise JoinError("the inviter's answer does not open with this code")
        return token, address
    raise JoinError(
        "no node found has that invitation: " + "; ".join(errors)
        if errors
        else "no quorum node answered on this network; pass --via HOST:PORT (the inviter's peer port)"
    )


class _CodeStarted(msgspec.Struct, frozen=True):
    session: str
    message: bytes


class _CodeFinished(msgspec.Struct, frozen=True):
    token: bytes
