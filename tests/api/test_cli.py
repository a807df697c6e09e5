"""`quorum-node run` and `quorum-node models` as a person runs them: a real process."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import openai
import pytest

from quorum_node.node import Node
from tests.fakes.engines import FakeEngine
from tests.support import QN, clean_env, cli

StartFake = Callable[..., Awaitable[FakeEngine]]
StartNode = Callable[..., Awaitable[Node]]

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class Daemon:
    """A `quorum-node run` process; its port is read from the `node_started` log line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.port = 0
        self.log: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_started(self, timeout_s: float = 15.0) -> None:
        async with asyncio.timeout(timeout_s):
            while True:
                line = await self.proc.stderr.readline()  # type: ignore[union-attr]
                if not line:
                    raise AssertionError(f"quorum-node exited early: {self.log}")
                event = json.loads(line)  # every log line is one JSON object
                self.log.append(event)
                if event.get("event") == "node_started":
                    self.port = event["port"]
                    return

    async def drain_log(self) -> list[dict]:
        rest = await self.proc.stderr.read()  # type: ignore[union-attr]
        self.log += [json.loads(ln) for ln in rest.decode().splitlines() if ln.strip()]
        return self.log


@pytest.fixture
async def run_daemon(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Daemon]]]:
    daemons: list[Daemon] = []

    async def _run(*args: str) -> Daemon:
        proc = await asyncio.create_subprocess_exec(
            QN,
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--log-format",
            "json",
            "--no-detect",
            "--no-mdns",
            "--no-embedded-engine",
            "--data-dir",
            str(tmp_path / f"d{len(daemons)}"),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=clean_env(),
        )
        d = Daemon(proc)
        daemons.append(d)
        await d.wait_started()
        return d

    yield _run
    for d in daemons:
        if d.proc.returncode is None:
            d.proc.kill()
            await d.proc.wait()


async def test_run_serves_the_engines_models_and_stops_on_sigterm(
    fake: StartFake, run_daemon: Callable[..., Awaitable[Daemon]]
) -> None:
    eng = await fake("vllm")
    d = await run_daemon("--backend", f"vllm={eng.url}", "--name", "study")
    assert d.port > 0
    async with openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="x", max_retries=0) as client:
        raw = await client.models.with_raw_response.list()
        assert raw.headers["X-Quorum-Node"] == "study"
        assert [m.id for m in raw.parse().data] == [MODEL]
        done = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert done.choices[0].message.content == "Hello, world!"
    d.proc.send_signal(signal.SIGTERM)
    rc = await asyncio.wait_for(d.proc.wait(), 5)
    assert rc == 0
    events = [e["event"] for e in await d.drain_log()]
    assert "node_stopped" in events
    assert not any(e.get("level") in ("error", "critical") for e in d.log), d.log
    request_lines = [e for e in d.log if e["event"] == "request"]
    assert request_lines and request_lines[-1]["status"] == 200 and request_lines[-1]["engine"]


async def test_sigterm_during_a_stream_still_exits_promptly(
    fake: StartFake, run_daemon: Callable[..., Awaitable[Daemon]]
) -> None:
    eng = await fake("vllm", tokens=["tok "] * 1000, token_delay_s=0.05)
    d = await run_daemon("--backend", f"vllm={eng.url}", "--drain-timeout-s", "1")
    async with aiohttp.ClientSession() as http:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with http.post(d.url + "/v1/chat/completions", json=body) as resp:
            await resp.content.readline()
            d.proc.send_signal(signal.SIGTERM)
            rc = await asyncio.wait_for(d.proc.wait(), 5)
    assert rc == 0
    await asyncio.wait_for(eng.wait_until(lambda e: e.active_streams == 0), 5)


async def test_models_command_prints_the_table(fake: StartFake, run_daemon: Callable[..., Awaitable[Daemon]]) -> None:
    eng = await fake("ollama")
    d = await run_daemon("--backend", f"ollama={eng.url}")
    rc, out, err = await cli("models", "--url", d.url)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["MODEL", "ENGINE", "NODE", "CONTEXT", "LOADED", "SHARDED", "GROUPED"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert set(rows) == {"llama3.2:latest", "nomic-embed-text:latest"}
    assert rows["llama3.2:latest"][1] == "ollama"


async def test_models_command_without_a_node_is_a_clear_error(start_node: StartNode) -> None:
    node = await start_node()
    url = node.url
    await node.stop()  # nothing listens there any more
    rc, out, err = await cli("models", "--url", url)
    assert rc == 1 and out == ""
    assert err.startswith("quorum-node: cannot reach the node") and "Traceback" not in err


async def test_port_in_use_exits_1_with_a_message(start_node: StartNode, tmp_path: Path) -> None:
    node = await start_node()
    rc, _out, err = await cli(
        "run",
        "--host",
        "127.0.0.1",
        "--port",
        str(node.port),
        "--log-format",
        "json",
        "--no-detect",
        "--no-mdns",
        "--no-embedded-engine",
        "--data-dir",
        str(tmp_path / "x"),
    )
    assert rc == 1
    failed = [json.loads(ln) for ln in err.splitlines() if "listen_failed" in ln]
    assert failed and failed[0]["port"] == node.port
    assert "Traceback" not in err
