"""``quorum-node doctor`` (issue 23): each fault named, with its fix; a clean setup reports no problem.

Run as a user would (the command against a running node); the faults are made for real: an engine that is
down, a web app on a port the node probes for engines, a member that never shows up, a relay that refuses
the token, no node at all.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from aiohttp import web

from quorum_node.api.server import close_runner
from quorum_node.control.doctor import _environment
from quorum_relay.server import Relay
from quorum_relay.settings import Settings as RelaySettings
from tests.members_support import CLUSTER, enrol
from tests.relay.wan import TOKEN, RelayHandle
from tests.support import cli, eventually


async def doctor(node: Any) -> tuple[int, dict[str, Any], str]:
    rc, out, err = await cli("doctor", "--json", "--url", node.url, "--data-dir", node.settings.data_dir)
    return rc, json.loads(out), err


def of(report: dict[str, Any], check: str) -> list[dict[str, Any]]:
    return [f for f in report["findings"] if f["check"] == check]


async def test_a_clean_node_reports_no_problem(start_node: Any, fake: Any) -> None:
    eng = await fake("ollama")
    node = await start_node(backends=[{"kind": "ollama", "url": eng.url}])
    rc, report, err = await doctor(node)
    assert rc == 0, err
    assert [f["status"] for f in report["findings"]] == ["ok"] * len(report["findings"])
    assert "ready, 2 models" in of(report, "engines")[0]["message"]
    rc, out, _ = await cli("doctor", "--url", node.url, "--data-dir", node.settings.data_dir)
    assert rc == 0 and "no problem found" in out


async def test_an_engine_down_and_a_web_app_on_an_engine_port_are_named_with_their_fix(start_node: Any) -> None:
    async def spa(request: web.Request) -> web.Response:  # Open WebUI's single-page app: HTML everywhere
        return web.Response(text="<!doctype html><title>Open WebUI</title>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", spa)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    web_port = runner.addresses[0][1]
    with socket.socket() as nobody:
        nobody.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{nobody.getsockname()[1]}"
        try:
            node = await start_node(detect=True, detect_ports=[web_port], backends=[{"kind": "vllm", "url": dead}])
            await eventually(lambda: node.registry.not_engines() != [], "the web app is identified")
            rc, report, _ = await doctor(node)
        finally:
            await close_runner(runner)
    assert rc == 1  # a check failed
    engines = {f["status"]: f for f in of(report, "engines")}
    assert dead in engines["fail"]["message"] and "--backend" in engines["fail"]["fix"]
    assert f"127.0.0.1:{web_port}" in engines["warn"]["message"] and "no engine" in engines["warn"]["message"]
    assert "--backend KIND=" in engines["warn"]["fix"]


async def test_a_member_never_seen_and_a_refused_relay_token(start_node: Any, tmp_path: Path) -> None:
    relay = RelayHandle()
    await relay.start()
    try:
        enrol(tmp_path, CLUSTER["cluster"], CLUSTER["cluster_secret"], tmp_path / "absent", "absent")
        node = await start_node(relay=relay.url, relay_token="not-the-token", **CLUSTER)
        assert node.cluster is not None and node.cluster.relay is not None
        await eventually(lambda: node.cluster.relay.state == "refused", "the relay refuses the token", timeout_s=10)
        rc, report, _ = await doctor(node)
    finally:
        await relay.stop()
    assert rc == 1
    [relay_finding] = of(report, "relay")
    assert relay_finding["status"] == "fail" and "--relay-token" in relay_finding["fix"]
    [absent] = [f for f in of(report, "peers") if "absent" in f["message"]]
    assert absent["status"] == "warn" and "never seen" in absent["message"] and "--peer HOST:PORT" in absent["fix"]


async def test_no_node_is_said_so() -> None:
    with socket.socket() as nobody:
        nobody.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{nobody.getsockname()[1]}"
        rc, out, _ = await cli("doctor", "--url", url)
    assert rc == 1 and "no node answers" in out and "quorum-node run" in out


async def test_two_members_on_the_relay_who_do_not_meet_there_are_named(start_node: Any, tmp_path: Path) -> None:
    """Each connected, each with a token the relay takes, but of two namespaces: they never meet there."""
    other = "another-token-0123456789"
    relay = Relay(RelaySettings(host="127.0.0.1", port=0, tokens=(TOKEN, other), log_format="json"))
    await relay.start()
    try:
        a = await start_node(relay=relay.url, relay_token=TOKEN, **CLUSTER)
        b = await start_node(relay=relay.url, relay_token=other, peers=(f"127.0.0.1:{a.peer_port}",), **CLUSTER)
        for n in (a, b):
            assert n.cluster is not None and n.cluster.relay is not None and await n.cluster.relay.wait_up(10)
        await eventually(lambda: any(p.state.value == "up" for p in b.cluster.table.all()), "b reaches a on the LAN")
        rc, report, _ = await doctor(b)
    finally:
        await relay.stop()
    [apart] = [f for f in of(report, "relay") if f["status"] == "warn"]
    assert apart["message"].startswith(f"{a.name} does not see this node on its relay")
    assert "namespace" in apart["fix"]
    assert rc == 0  # a warning: they are served on the LAN all the same


def test_wsl_and_docker_are_named_with_their_fix(tmp_path: Path) -> None:
    version, dockerenv = tmp_path / "version", tmp_path / ".dockerenv"
    version.write_text("Linux version 6.6.36.3-microsoft-standard-WSL2 (root@f5d3c0) (gcc (GCC) 11.2.0)")
    [wsl] = _environment(version, dockerenv)
    assert "WSL" in wsl.message and "mirrored" in wsl.fix
    version.write_text("Linux version 6.1.0-27-amd64 (debian-kernel@lists.debian.org)")
    assert _environment(version, dockerenv) == []  # a plain machine: nothing to say
    dockerenv.touch()
    [docker] = _environment(version, dockerenv)
    assert "Docker" in docker.message and "--network host" in docker.fix
