"""The dashboard's page and its admin endpoints: /dashboard, /quorum/admin/fleet, /quorum/admin/events.

Nodes run in-process on 127.0.0.1 with fake engines; peers find each other
through static peers. The events stream is read as raw SSE bytes with aiohttp
(what the page's script reads), requests are made with the real openai SDK.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from quorum_node import cli
from quorum_node.api.dashboard import CSP, EVENTS
from quorum_node.api.dashboard.events import EventHub
from quorum_node.node import Node
from quorum_node.records import Record
from tests.conftest import StartFake, StartNode
from tests.support import eventually

CLUSTER = {"cluster": "dash", "cluster_secret": "dash-secret"}
MESSAGES = [{"role": "user", "content": "hi"}]


def hub_of(node: Node) -> EventHub:
    assert node.app is not None
    return node.app[EVENTS]


async def two_nodes(start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession) -> tuple[Node, Node, Any]:
    e0 = await fake("openai", models=["alpha-model"])
    e1 = await fake("openai", models=["beta-model", "shared"])
    n0 = await start_node(name="north", backends=[{"kind": "openai", "url": e0.url}], **CLUSTER)
    n1 = await start_node(name="south", backends=[{"kind": "openai", "url": e1.url}], **CLUSTER)
    assert n0.cluster is not None and n1.cluster is not None
    n0.cluster.table.add_static(f"127.0.0.1:{n1.peer_port}")
    n1.cluster.table.add_static(f"127.0.0.1:{n0.peer_port}")

    async def converged() -> bool:
        f = await get_json(http, n0.url + "/quorum/admin/fleet")
        return {m["id"]: m["holders"] for m in f["models"]} == {
            "alpha-model": ["north"],
            "beta-model": ["south"],
            "shared": ["south"],
        }

    await eventually(converged, timeout_s=10, what="north's fleet shows both nodes' models")
    return n0, n1, e1


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


class Events:
    """An open /quorum/admin/events stream, parsed into (name, data) events."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.buf = b""

    async def next(self, timeout_s: float = 5.0) -> tuple[str, Any]:
        async with asyncio.timeout(timeout_s):
            while b"\n\n" not in self.buf:
                chunk = await self.resp.content.readany()
                if not chunk:
                    raise EOFError("the events stream ended")
                self.buf += chunk
        block, self.buf = self.buf.split(b"\n\n", 1)
        name, data = "message", b""
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data += line[6:]
        if not data:
            return await self.next(timeout_s)
        return name, json.loads(data)

    async def until(self, name: str, where: Any = lambda d: True, timeout_s: float = 5.0) -> Any:
        async with asyncio.timeout(timeout_s):
            while True:
                n, d = await self.next(timeout_s)
                if n == name and where(d):
                    return d


@pytest.fixture
async def events(http: aiohttp.ClientSession) -> AsyncIterator[Any]:
    opened: list[aiohttp.ClientResponse] = []

    async def _open(node: Node) -> Events:
        resp = await http.get(node.url + "/quorum/admin/events")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        opened.append(resp)
        return Events(resp)

    yield _open
    for r in opened:
        r.close()


# -- the page ------------------------------------------------------------------------------------


async def test_page_and_assets_are_served_with_a_strict_csp(start_node: StartNode, http: aiohttp.ClientSession) -> None:
    node = await start_node()
    async with http.get(node.url + "/dashboard") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert resp.headers["Content-Security-Policy"] == CSP
        assert "default-src 'self'" in CSP and "unsafe-inline" not in CSP
        html = await resp.text()
    scripts = re.findall(r"<script[^>]*>", html)
    assert scripts and all("src=" in s for s in scripts), "no inline script (the CSP would block it)"
    assert " style=" not in html and "<style" not in html
    assert "http://" not in html and "https://" not in html, "every asset comes from the node (works offline)"
    for name, ctype in (("app.js", "text/javascript"), ("app.css", "text/css"), ("favicon.svg", "image/svg+xml")):
        assert f"/dashboard/static/{name}" in html
        async with http.get(node.url + f"/dashboard/static/{name}") as resp:
            assert resp.status == 200 and resp.content_type == ctype
            etag = resp.headers["ETag"]
            body = await resp.read()
        assert b"https://" not in body.replace(b"http://www.w3.org/", b"")  # no CDN (SVG namespaces aside)
        async with http.get(node.url + f"/dashboard/static/{name}", headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/static/nope.js",
        "/dashboard/static/..%2F__init__.py",
        "/dashboard/static/index.html",
        "/dashboard/static/%00",
        "/dashboard/static/" + "a" * 5000,
    ],
)
async def test_unknown_assets_are_a_json_404(start_node: StartNode, http: aiohttp.ClientSession, path: str) -> None:
    node = await start_node()
    async with http.get(node.url + path) as resp:
        assert resp.status in (404, 414, 431)
        if resp.status == 404:
            assert (await resp.json())["error"]["code"] == "unknown_path"


async def test_a_browser_at_the_root_is_sent_to_the_dashboard(
    start_node: StartNode, http: aiohttp.ClientSession
) -> None:
    node = await start_node()
    async with http.get(
        node.url + "/", headers={"Accept": "text/html,application/xhtml+xml"}, allow_redirects=False
    ) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/dashboard"
    async with http.get(node.url + "/") as resp:  # not a browser: no redirect
        assert resp.status == 200


async def test_wrong_methods_on_admin_endpoints_are_json_errors(
    start_node: StartNode, http: aiohttp.ClientSession
) -> None:
    node = await start_node()
    for path in ("/quorum/admin/fleet", "/quorum/admin/events", "/dashboard"):
        async with http.post(node.url + path, data=b"{}") as resp:
            assert resp.status == 405
            assert (await resp.json())["error"]["code"] == "method_not_allowed"


# -- the fleet -----------------------------------------------------------------------------------


async def test_fleet_shows_every_node_with_presence_and_the_models_holders(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession
) -> None:
    t0 = time.time()
    n0, _n1, _ = await two_nodes(start_node, fake, http)
    f = await get_json(http, n0.url + "/quorum/admin/fleet")
    assert f["self"]["name"] == "north" and f["cluster"] == "dash"
    by_name = {n["name"]: n for n in f["nodes"]}
    assert set(by_name) == {"north", "south"}
    south = by_name["south"]
    assert south["online"] is True and south["state"] == "up"
    assert south["routes"] == ["lan"]
    assert t0 - 1 <= south["since"] <= time.time()
    assert south["models"] == ["beta-model", "shared"]
    assert [e["kind"] for e in south["engines"]] == ["openai"] and south["engines"][0]["state"] == "ready"
    assert south["load"] == {"in_flight": 0, "engines": 0, "waiting": 0}
    assert by_name["north"]["self"] is True and by_name["north"]["models"] == ["alpha-model"]
    assert {m["id"]: m["engines"] for m in f["models"]}["shared"] == ["openai"]
    assert set(f["features"]) == {"keys", "usage", "recent"}


async def test_a_peers_load_and_a_restart_show_in_the_fleet_and_in_quorum_node_peers(
    start_node: StartNode,
    fake: StartFake,
    http: aiohttp.ClientSession,
    client_for: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    n0, n1, e1 = await two_nodes(start_node, fake, http)
    e1.token_delay_s = 0.2  # a few seconds of streaming on south

    async def south(check: Any) -> bool:
        f = await get_json(http, n0.url + "/quorum/admin/fleet")
        return check(next(n for n in f["nodes"] if n["name"] == "south"))

    client = client_for(n1)
    stream = await client.chat.completions.create(model="beta-model", messages=MESSAGES, stream=True)
    try:
        await eventually(
            lambda: south(lambda s: s["load"] and s["load"]["in_flight"] == 1),
            timeout_s=5,
            what="north sees south answering one request",
        )
        await eventually(lambda: south(lambda s: s["load"]["engines"] == 1), what="and its engine busy")
        rc = await asyncio.to_thread(cli.main, ["peers", "--url", n0.url])
        out = capsys.readouterr().out
        assert rc == 0
        lines = out.splitlines()
        at = next(i for i, ln in enumerate(lines) if ln.startswith("NAME "))  # (log lines share stdout)
        header, row = lines[at], lines[at + 1]
        cols = dict(zip(header.split(), row.split(), strict=False))
        assert cols["NAME"] == "south" and cols["STATE"] == "up"
        assert re.fullmatch(r"\d+s", cols["SINCE"]) and cols["LOAD"] == "1"
    finally:
        await stream.close()


async def test_online_since_starts_again_when_a_peer_comes_back(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession
) -> None:
    e0 = await fake("openai", models=["a"])
    n0 = await start_node(name="stays", backends=[{"kind": "openai", "url": e0.url}], peer_down_after_s=1.0, **CLUSTER)
    e1 = await fake("openai", models=["b"])
    # "leaves" was admitted after "stays" started: it reaches "stays" to introduce itself (its membership),
    # as a node that joined through another member does, before "stays" can trust its certificate
    to_n0 = [f"127.0.0.1:{n0.peer_port}"]
    n1 = await start_node(name="leaves", backends=[{"kind": "openai", "url": e1.url}], peers=to_n0, **CLUSTER)
    assert n0.cluster is not None
    n0.cluster.table.add_static(f"127.0.0.1:{n1.peer_port}")

    async def leaves() -> dict[str, Any] | None:
        f = await get_json(http, n0.url + "/quorum/admin/fleet")
        return next((n for n in f["nodes"] if n["name"] == "leaves"), None)

    async def online() -> bool:
        p = await leaves()
        return bool(p and p["online"])

    await eventually(online, what="the peer is online")
    first = (await leaves())["since"]  # type: ignore[index]
    port, peer_port = n1.port, n1.peer_port
    await n1.stop()

    async def gone() -> bool:
        p = await leaves()
        return bool(p and not p["online"] and p["since"] is None)

    await eventually(gone, what="the stopped peer is offline, since nothing")
    again = await start_node(
        name="leaves",
        port=port,
        peer_port=peer_port,
        data_dir=n1.settings.data_dir,
        backends=[{"kind": "openai", "url": e1.url}],
        peers=to_n0,
        **CLUSTER,
    )
    assert again.port == port and again.peer_port == peer_port
    await eventually(online, timeout_s=10, what="the peer is back")
    assert (await leaves())["since"] > first  # type: ignore[index]


# -- live events ---------------------------------------------------------------------------------


async def test_events_say_hello_then_a_request_starting_and_ending(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession, client_for: Any, events: Any
) -> None:
    n0, _n1, e1 = await two_nodes(start_node, fake, http)
    ev = await events(n0)
    name, hello = await ev.next()
    assert name == "hello"
    assert {n["name"] for n in hello["fleet"]["nodes"]} == {"north", "south"}
    assert hello["live"]["in_flight"] == 0
    e1.token_delay_s = 0.6  # a stream of 2 s or so: in flight for a tick or two

    async def chat() -> str:
        stream = await client_for(n0).chat.completions.create(
            model="shared", messages=MESSAGES, stream=True, extra_headers={"X-Request-Id": "dash-req-1"}
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    task = asyncio.create_task(chat())
    try:
        start = await ev.until("start", lambda d: d["request_id"] == "dash-req-1")
        assert start["model"] == "shared" and start["surface"] == "openai" and start["operation"] == "chat"
        tick = await ev.until("tick", lambda d: d["in_flight"] == 1 and d["requests"][0]["route"] is not None)
        live = tick["requests"][0]
        assert live["request_id"] == "dash-req-1" and live["serving_node"] == "south" and live["route"] == "lan"
        assert live["age_ms"] > 0
        record = await ev.until("record", lambda d: d["request_id"] == "dash-req-1", timeout_s=10)
        assert record["serving_node"] == "south" and record["route"] == "lan" and record["status"] == 200
        assert record["completion_tokens"] and record["ttft_ms"] is not None
        assert await task == "Hello, world!"
        await ev.until("tick", lambda d: d["in_flight"] == 0)
    finally:
        task.cancel()


async def test_events_tell_a_fleet_change(
    start_node: StartNode, fake: StartFake, http: aiohttp.ClientSession, events: Any
) -> None:
    n0, n1, e1 = await two_nodes(start_node, fake, http)
    ev = await events(n0)
    await ev.until("hello")
    e1.models.append("brand-new")
    await n1.registry.refresh_once()
    fleet = await ev.until("fleet", lambda f: any(m["id"] == "brand-new" for m in f["models"]), timeout_s=10)
    assert next(m for m in fleet["models"] if m["id"] == "brand-new")["holders"] == ["south"]


def _record(i: int) -> Record:
    return Record(
        time=time.time(),
        request_id=f"r{i}",
        node="n",
        method="POST",
        path="/v1/chat/completions",
        surface="openai",
        operation="chat",
        model="m" * 4000,
        status=200,
    )


async def test_a_subscriber_that_does_not_read_loses_events_not_memory(start_node: StartNode) -> None:
    node = await start_node()
    hub = hub_of(node)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", node.port))
    try:
        await loop.sock_sendall(sock, b"GET /quorum/admin/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await eventually(lambda: _true(len(hub.subscribers) == 1), what="subscribed")
        (sub,) = hub.subscribers
        for i in range(3000):  # ~12 MB of events, far past every socket buffer
            hub.on_record(_record(i))
            if i % 100 == 0:
                await asyncio.sleep(0)
        assert sub.queue.qsize() <= hub.queue_size
        assert sub.dropped > 0
        # now read: the stream goes on, and says what was lost before the next event
        seen = b""
        async with asyncio.timeout(10):
            while b"event: dropped" not in seen:
                seen = (seen + await loop.sock_recv(sock, 65536))[-200_000:]
    finally:
        sock.close()
    await eventually(lambda: _true(not hub.subscribers), what="the closed subscriber is removed")


async def _true(v: bool) -> bool:
    return v


async def test_a_subscriber_that_leaves_is_removed(start_node: StartNode, events: Any) -> None:
    node = await start_node()
    hub = hub_of(node)
    ev = await events(node)
    await ev.until("hello")
    assert len(hub.subscribers) == 1
    ev.resp.close()
    await eventually(lambda: _true(not hub.subscribers), what="the subscriber is removed on disconnect")
    await eventually(lambda: _true(hub._ticker is None), what="and the ticker stops with nobody watching")


async def test_too_many_subscribers_are_refused(
    start_node: StartNode, events: Any, http: aiohttp.ClientSession
) -> None:
    node = await start_node()
    hub = hub_of(node)
    hub.max_subscribers = 2
    for _ in range(2):
        await (await events(node)).until("hello")
    async with http.get(node.url + "/quorum/admin/events") as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "too_many_subscribers"


async def test_an_open_events_stream_does_not_hold_up_stop(start_node: StartNode, events: Any) -> None:
    node = await start_node(drain_timeout_s=5.0)
    ev = await events(node)
    await ev.until("hello")
    t0 = time.monotonic()
    await node.stop()
    assert time.monotonic() - t0 < 2.0  # nothing in flight: no drain wait, and the stream ends at once
    with pytest.raises((EOFError, aiohttp.ClientError)):
        while True:
            await ev.next(timeout_s=2)


async def test_the_sinks_cost_nothing_without_subscribers(
    start_node: StartNode, fake: StartFake, client_for: Any
) -> None:
    eng = await fake("openai", models=["m"])
    node = await start_node(backends=[{"kind": "openai", "url": eng.url}])
    client: openai.AsyncOpenAI = client_for(node)
    await client.chat.completions.create(model="m", messages=MESSAGES)
    assert not node.records.live  # every started request left the live set when sealed
    assert hub_of(node)._ticker is None


async def test_fleet_and_events_are_for_admins_where_keys_are_required(
    start_node: StartNode, http: aiohttp.ClientSession
) -> None:
    node = await start_node(require_key=True)
    _, admin = node.keys.create("ops", admin=True)
    _, plain = node.keys.create("app")
    for path in ("/quorum/admin/fleet", "/quorum/admin/events"):
        async with http.get(node.url + path) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "missing_api_key"
        async with http.get(node.url + path, headers={"Authorization": f"Bearer {plain}"}) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "not_admin"
        async with http.get(node.url + path, headers={"Authorization": f"Bearer {admin}"}) as resp:
            assert resp.status == 200
    async with http.get(node.url + "/dashboard") as resp:  # the page itself holds nothing: it asks for the key
        assert resp.status == 200
    async with http.get(node.url + "/dashboard/static/app.js") as resp:
        assert resp.status == 200
