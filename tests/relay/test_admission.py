"""Admission at the handshake, /health and /metrics, TLS, and the stop."""

from __future__ import annotations

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
from websockets.exceptions import InvalidStatus

from relay.cli import main
from relay.server import Relay
from relay.wire import NODE_ID_HEADER, Hello, Left, Unreachable, Welcome, decode

from .conftest import TOKEN_A, TOKEN_B, WAIT_S, Connect, StartRelay, headers, joined


async def refused(relay: Relay, node_id: str | None, token: str | None, **extra: str) -> tuple[int, dict, dict]:
    """Try a handshake that must fail; the status, JSON body and headers."""
    h = headers(node_id, token) | extra
    with pytest.raises(InvalidStatus) as e:
        await connect(relay.connect_url, additional_headers=h, open_timeout=WAIT_S)
    resp = e.value.response
    return resp.status_code, msgspec.json.decode(resp.body), dict(resp.headers.raw_items())


@pytest.mark.parametrize(
    "auth",
    [None, "Bearer 0123456789abcdef-wrong", f"Bearer {TOKEN_A[:-1]}", f"Basic {TOKEN_A}", f"Bearer {TOKEN_A}x"],
    ids=["missing", "wrong", "prefix", "not-bearer", "longer"],
)
async def test_bad_or_missing_token_is_401_and_never_registered(
    relay: Relay, join: Connect, auth: str | None
) -> None:
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
    await a.send(Hello(peer="b", payload=b"x"))
    assert await a.expect(Unreachable) == Unreachable(peer="b", stream=0)


async def test_good_token_gets_welcome_with_limits(start_relay: StartRelay, join: Connect) -> None:
    relay = await start_relay(max_frame_bytes=65536, max_streams_per_node=7, send_queue_bytes=1 << 20)
    a = await join(relay, "node-a.1")
    w = a.welcome
    assert w.node_id == "node-a.1" and w.peers == () and len(w.session) >= 16
    assert (w.max_frame_bytes, w.max_streams, w.send_queue_bytes) == (65536, 7, 1 << 20)
    b = await join(relay, "b")
    assert b.welcome.session != w.session


@pytest.mark.parametrize("node_id", [None, "", "has space", "x" * 65, "slash/no", "a,b"])
async def test_bad_node_id_is_400_but_only_after_the_token(relay: Relay, node_id: str | None) -> None:
    status, body, _ = await refused(relay, node_id, TOKEN_A)
    assert status == 400 and body["error"]["param"] == "X-Quorum-Node-Id"
    status, _, _ = await refused(relay, node_id, "0123456789abcdef-wrong")
    assert status == 401


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
    assert await b.expect(Left) == Left(node_id="a")  # sent once a's TCP connection is gone
    await join(relay, "c")


async def test_trusted_proxy_forwarded_for_is_the_address(start_relay: StartRelay, join: Connect) -> None:
    relay = await start_relay(max_connections_per_address=1, trusted_proxies=("127.0.0.1",))
    h1 = {"Authorization": f"Bearer {TOKEN_A}", NODE_ID_HEADER: "a", "X-Forwarded-For": "203.0.113.1"}
    h2 = {"Authorization": f"Bearer {TOKEN_A}", NODE_ID_HEADER: "b", "X-Forwarded-For": "203.0.113.2"}
    async with connect(relay.connect_url, additional_headers=h1) as w1, connect(
        relay.connect_url, additional_headers=h2
    ) as w2:
        assert isinstance(decode(await w1.recv()), Welcome) and isinstance(decode(await w2.recv()), Welcome)
        h3 = {"Authorization": f"Bearer {TOKEN_A}", NODE_ID_HEADER: "c", "X-Forwarded-For": "203.0.113.1"}
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
    await a.send(Hello(peer="b", payload=b"12345"))
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
        welcome = decode(await ws.recv())
        assert isinstance(welcome, Welcome) and welcome.node_id == "a"
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
