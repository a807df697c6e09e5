"""Admission at the handshake, /health and /metrics, TLS, and the stop."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import time
from pathlib import Path

import aiohttp
import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from quorum_relay.cli import main
from quorum_relay.server import Relay
from quorum_relay.wire import (
    CLOSE_REPLACED,
    CLOSE_UNAUTHORIZED,
    NODE_ID_HEADER,
    NODE_KEY_HEADER,
    Challenge,
    Hello,
    Joined,
    Left,
    Proof,
    Unreachable,
    Welcome,
    decode,
    encode,
    proof_message,
)

from .conftest import TOKEN_A, TOKEN_B, WAIT_S, Connect, StartRelay, headers, joined, key, nid, prove, public


async def refused(
    relay: Relay, label: str | None, token: str | None, *, node_id: str | None = None, **extra: str
) -> tuple[int, dict, dict]:
    """Try a handshake that must fail; the status, JSON body and headers."""
    h = headers(label, token, node_id=node_id) | extra
    with pytest.raises(InvalidStatus) as e:
        await connect(relay.connect_url, additional_headers=h, open_timeout=WAIT_S)
    resp = e.value.response
    return resp.status_code, msgspec.json.decode(resp.body), dict(resp.headers.raw_items())


@pytest.mark.parametrize(
    "auth",
    [None, "Bearer 0123456789abcdef-wrong", f"Bearer {TOKEN_A[:-1]}", f"Basic {TOKEN_A}", f"Bearer {TOKEN_A}x"],
    ids=["missing", "wrong", "prefix", "not-bearer", "longer"],
)
async def test_bad_or_missing_token_is_401_and_never_registered(relay: Relay, join: Connect, auth: str | None) -> None:
    extra = {} if auth is None else {"Authorization": auth}
    status, alone, _ = await refused(relay, "b", None, **extra)
    a = await join(relay, "a")
    status2, crowded, _ = await refused(relay, "b", None, **extra)
    assert status == status2 == 401
    assert alone == crowded  # the refusal is the same whoever is online
    assert alone["error"]["type"] == "authentication_error" and alone["error"]["code"] == "unauthorized"
    assert set(alone["error"]) == {"message", "type", "param", "code"}
    # it never joined: the next node in is the first "a" hears of, and "b" is not reachable
    await join(relay, "c")
    await joined(a, "c")
    assert relay.connections == 2
    await a.send(Hello(peer=nid("b"), payload=b"x"))
    assert await a.expect(Unreachable) == Unreachable(peer=nid("b"), stream=0)


async def test_good_token_gets_welcome_with_limits(start_relay: StartRelay, join: Connect) -> None:
    relay = await start_relay(max_frame_bytes=65536, max_streams_per_node=7, send_queue_bytes=1 << 20)
    a = await join(relay, "node-a.1")
    w = a.welcome
    assert w.node_id == nid("node-a.1") and w.peers == () and len(w.session) >= 16
    assert (w.max_frame_bytes, w.max_streams, w.send_queue_bytes) == (65536, 7, 1 << 20)
    b = await join(relay, "b")
    assert b.welcome.session != w.session


@pytest.mark.parametrize("node_id", [None, "", "has space", "x" * 65, "slash/no", "a,b"])
async def test_bad_node_id_is_400_but_only_after_the_token(relay: Relay, node_id: str | None) -> None:
    label = None if node_id is None else "b"
    status, body, _ = await refused(relay, label, TOKEN_A, node_id=node_id)
    assert status == 400 and body["error"]["param"] == "X-Quorum-Node-Id"
    status, _, _ = await refused(relay, label, "0123456789abcdef-wrong", node_id=node_id)
    assert status == 401


@pytest.mark.parametrize("case", ["another's id", "no key", "short key", "not base64", "two keys"])
async def test_a_node_id_that_is_not_the_keys_is_401(relay: Relay, join: Connect, case: str) -> None:
    a = await join(relay, "a")
    h = headers("x", TOKEN_A)  # x's own key ...
    if case == "another's id":
        h[NODE_ID_HEADER] = nid("a")  # ... claiming a's id
    elif case == "no key":
        del h[NODE_KEY_HEADER]
    elif case == "short key":
        h[NODE_KEY_HEADER] = h[NODE_KEY_HEADER][:-4]
    elif case == "not base64":
        h[NODE_KEY_HEADER] = "!" * 44
    with pytest.raises(InvalidStatus) as e:
        if case == "two keys":
            await connect(
                relay.connect_url,
                additional_headers=[*h.items(), (NODE_KEY_HEADER, h[NODE_KEY_HEADER])],
                open_timeout=WAIT_S,
            )
        await connect(relay.connect_url, additional_headers=h, open_timeout=WAIT_S)
    resp = e.value.response
    body = msgspec.json.decode(resp.body)
    assert resp.status_code == 401 and body["error"]["code"] == "bad_node_key"
    assert body["error"]["param"] == NODE_KEY_HEADER
    assert relay.stats.rejections["bad_node_key"] == 1
    # a was never disturbed: still registered, still reachable
    b = await join(relay, "b")
    await joined(a, "b")
    await b.send(Hello(peer=nid("a"), payload=b"still there?"))
    assert await a.expect(Hello) == Hello(peer=nid("b"), payload=b"still there?")


async def _claim(relay: Relay, label: str, signer: str | None, *, frame: bytes | None = None) -> int | None:
    """Connect as ``label`` (its id and public key) and answer the challenge signed by ``signer``'s key
    (or send ``frame``, or nothing): the close code the relay ends the connection with."""
    async with connect(relay.connect_url, additional_headers=headers(label, TOKEN_A), open_timeout=WAIT_S) as ws:
        challenge = decode(await ws.recv())
        assert isinstance(challenge, Challenge) and len(challenge.nonce) == 32
        if signer is not None:
            k = key(signer)
            await ws.send(
                encode(Proof(signature=k.sign(proof_message(challenge.nonce, nid(label), public(key(label))))))
            )
        elif frame is not None:
            await ws.send(frame)
        async with asyncio.timeout(WAIT_S):
            with pytest.raises(ConnectionClosed):
                while True:
                    got = decode(await ws.recv())
                    assert not isinstance(got, Welcome), "admitted without a proof"
        return None if ws.close_code is None else int(ws.close_code)


async def test_a_node_that_cannot_sign_for_a_members_key_is_closed_and_displaces_no_one(
    start_relay: StartRelay, join: Connect
) -> None:
    relay = await start_relay(open_timeout_s=0.5)
    a = await join(relay, "a")
    b = await join(relay, "b")
    await joined(a, "b")
    # a's id and a's public key (both public), then: another key's signature, a signature of something else,
    # a frame that is no proof, no answer at all (until the open timeout)
    assert await _claim(relay, "a", "x") == CLOSE_UNAUTHORIZED
    assert (
        await _claim(relay, "a", None, frame=encode(Proof(signature=key("a").sign(b"anything else"))))
        == CLOSE_UNAUTHORIZED
    )
    assert await _claim(relay, "a", None, frame=encode(Hello(peer=nid("b"), payload=b"me first"))) == CLOSE_UNAUTHORIZED
    assert await _claim(relay, "a", None) == CLOSE_UNAUTHORIZED
    assert relay.stats.rejections["bad_proof"] == 2 and relay.stats.rejections["no_proof"] == 2
    # a was never replaced, and b heard of nothing: its next frame is what a sends it
    await a.send(Hello(peer=nid("b"), payload=b"still a"))
    assert await b.expect(Hello) == Hello(peer=nid("a"), payload=b"still a")
    await b.send(Hello(peer=nid("a"), payload=b"to a"))
    assert await a.expect(Hello) == Hello(peer=nid("b"), payload=b"to a")
    assert relay.connections == 2 and relay.stats.closes["replaced"] == 0


async def test_reconnecting_with_a_victims_id_every_half_second_evicts_nothing(relay: Relay, join: Connect) -> None:
    a = await join(relay, "a")
    b = await join(relay, "b")
    await joined(a, "b")
    for _ in range(4):  # the old attack: a valid token, the victim's id (and its public key), every 0.5 s
        assert await _claim(relay, "b", "x") == CLOSE_UNAUTHORIZED
        await asyncio.sleep(0.5)
    await a.send(Hello(peer=nid("b"), payload=b"are you there"))
    assert await b.expect(Hello) == Hello(peer=nid("a"), payload=b"are you there")  # no Left, no Joined before it
    assert relay.stats.closes["replaced"] == 0


async def test_the_same_node_reconnecting_replaces_its_old_connection(relay: Relay, join: Connect) -> None:
    a = await join(relay, "a")
    b1 = await join(relay, "b")
    await joined(a, "b")
    b2 = await join(relay, "b")  # it holds the key: its new connection wins
    assert await b1.closed_with() == CLOSE_REPLACED
    assert await a.expect(Left) == Left(node_id=nid("b"))
    assert (await a.expect(Joined)).peer.node_id == nid("b")
    await a.send(Hello(peer=nid("b"), payload=b"new"))
    assert await b2.expect(Hello) == Hello(peer=nid("a"), payload=b"new")


def test_the_relays_node_id_is_the_nodes() -> None:
    from quorum_node.cluster.identity import NodeIdentity, node_id_for
    from quorum_relay.identity import node_id_for as relay_node_id_for

    for _ in range(8):
        ident = NodeIdentity.generate()
        assert relay_node_id_for(ident.sign_key) == node_id_for(ident.sign_key) == ident.node_id


async def test_handshake_rate_per_address_is_429(start_relay: StartRelay, join: Connect) -> None:
    relay = await start_relay(handshake_burst=3, handshake_rate_per_s=0.01)
    await join(relay, "a")
    await refused(relay, "b", "0123456789abcdef-wrong")  # failures spend tokens too
    await join(relay, "c")
    status, body, hdrs = await refused(relay, "d", TOKEN_A)
    assert status == 429 and body["error"]["code"] == "handshake_rate"
    assert int(hdrs["Retry-After"]) >= 1


async def test_connections_per_address_is_429_until_one_leaves(start_relay: StartRelay, join: Connect) -> None:
    relay = await start_relay(max_connections_per_address=2)
    a = await join(relay, "a")
    b = await join(relay, "b")
    status, body, _ = await refused(relay, "c", TOKEN_B)
    assert status == 429 and body["error"]["code"] == "too_many_connections"
    await a.close()
    await joined(b)
    assert await b.expect(Left) == Left(node_id=nid("a"))  # sent once a's TCP connection is gone
    await join(relay, "c")


async def test_trusted_proxy_forwarded_for_is_the_address(start_relay: StartRelay, join: Connect) -> None:
    relay = await start_relay(max_connections_per_address=1, trusted_proxies=("127.0.0.1",))
    h1 = headers("a", TOKEN_A) | {"X-Forwarded-For": "203.0.113.1"}
    h2 = headers("b", TOKEN_A) | {"X-Forwarded-For": "203.0.113.2"}
    async with (
        connect(relay.connect_url, additional_headers=h1) as w1,
        connect(relay.connect_url, additional_headers=h2) as w2,
    ):
        await prove(w1, "a")
        await prove(w2, "b")
        assert isinstance(decode(await w1.recv()), Welcome) and isinstance(decode(await w2.recv()), Welcome)
        h3 = headers("c", TOKEN_A) | {"X-Forwarded-For": "203.0.113.1"}
        with pytest.raises(InvalidStatus) as e:
            await connect(relay.connect_url, additional_headers=h3)
        assert e.value.response.status_code == 429


async def test_global_capacity_is_503(start_relay: StartRelay, join: Connect) -> None:
    relay = await start_relay(max_connections=1)
    await join(relay, "a")
    status, body, _ = await refused(relay, "b", TOKEN_A)
    assert status == 503 and body["error"]["code"] == "capacity"


async def test_health_metrics_and_404(relay: Relay, join: Connect) -> None:
    a = await join(relay, "a")
    b = await join(relay, "b")
    await joined(a, "b")
    await refused(relay, "x", "0123456789abcdef-wrong")
    await a.send(Hello(peer=nid("b"), payload=b"12345"))
    await b.expect(Hello)
    http = relay.url.replace("ws://", "http://")
    async with aiohttp.ClientSession() as s:
        async with s.get(http + "/health") as r:
            assert r.status == 200 and r.content_type == "application/json"
            health = await r.json()
        async with s.get(http + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await r.text()
        async with s.get(http + "/nope") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    assert health["status"] == "ok" and health["connections"] == 2 and health["namespaces"] == 1
    assert health["streams"] == 0 and health["uptime_s"] >= 0
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    assert metrics["quorum_relay_connections"] == 2
    assert metrics["quorum_relay_namespaces"] == 1
    assert metrics["quorum_relay_streams"] == 0
    assert metrics['quorum_relay_rejections_total{reason="unauthorized"}'] == 1
    assert metrics["quorum_relay_frames_in_total"] == 1
    assert metrics["quorum_relay_frames_out_total"] >= 4  # 2 Welcome, 1 Joined, the Hello
    assert metrics["quorum_relay_bytes_in_total"] > 5 and metrics["quorum_relay_bytes_out_total"] > 5
    assert metrics["process_resident_memory_bytes"] > 0 and metrics["process_open_fds"] > 0
    assert "node" not in "".join(k for k in metrics if "reason" not in k).replace("quorum", "")  # no ids


async def test_metrics_token(start_relay: StartRelay) -> None:
    relay = await start_relay(metrics_token="metrics-0123456789abcdef")
    http = relay.url.replace("ws://", "http://")
    async with aiohttp.ClientSession() as s:
        async with s.get(http + "/metrics") as r:
            assert r.status == 401
        async with s.get(http + "/metrics", headers={"Authorization": "Bearer metrics-0123456789abcdef"}) as r:
            assert r.status == 200
        async with s.get(http + "/health") as r:
            assert r.status == 200


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "quorum-relay test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


async def test_tls_wss_directly(start_relay: StartRelay, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    relay = await start_relay(tls_cert=str(cert), tls_key=str(key))
    assert relay.connect_url.startswith("wss://127.0.0.1:")
    client_ctx = ssl.create_default_context(cafile=str(cert))
    async with connect(relay.connect_url, additional_headers=headers("a", TOKEN_A), ssl=client_ctx) as ws:
        await prove(ws, "a")
        welcome = decode(await ws.recv())
        assert isinstance(welcome, Welcome) and welcome.node_id == nid("a")
    # a client that does not trust the certificate gets no WebSocket
    with pytest.raises(ssl.SSLCertVerificationError):
        await connect(relay.connect_url, additional_headers=headers("b", TOKEN_A), ssl=ssl.create_default_context())


async def test_stop_closes_every_node_with_1001_within_a_second(start_relay: StartRelay, join: Connect) -> None:
    relay = await start_relay()
    nodes = [await join(relay, f"n{i:02}") for i in range(12)]
    for i, n in enumerate(nodes):
        await joined(n, *(f"n{j:02}" for j in range(i + 1, len(nodes))))
    # one node that stopped reading must not hold the stop up past the close timeout
    nodes[0].ws.transport.pause_reading()
    t0 = time.monotonic()
    await relay.stop()
    assert time.monotonic() - t0 < relay.settings.close_timeout_s + 0.3
    for n in nodes[1:]:
        assert await n.closed_with() == 1001
    nodes[0].ws.transport.resume_reading()
    with pytest.raises(OSError):
        await connect(relay.connect_url, additional_headers=headers("late", TOKEN_A), open_timeout=1)


def test_cli_bad_config_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--port", "0"], env={}) == 2  # no tokens
    assert main(["--token", "short"], env={}) == 2
    assert main(["--tokens-file", str(tmp_path / "missing")], env={}) == 2
    (tmp_path / "bad").write_text("0123456789abcdef-x bad/label\n")
    assert main(["--tokens-file", str(tmp_path / "bad")], env={}) == 2
    assert main(["--token", TOKEN_A], env={"QUORUM_RELAY_PORT": "nope"}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("quorum-relay: ") for line in err)
