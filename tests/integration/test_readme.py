"""The README runs as written (issue 23): its quick start and each section's first example, against a real node.

The blocks are taken from ``README.md`` itself, so the README cannot drift
from what the software does: the quick start (every block before *The node*,
but the set-up commands themselves, which are what CI runs) and the first
code block of every ``##`` section. Each runs as a user would paste it: shell
blocks with ``bash -e``, Python blocks with this environment's Python (the
real ``openai``, ``ollama`` and ``anthropic`` SDKs), against a node serving
what a first run serves: the embedded engine (the real ``llama-server`` with
SmolLM2). The node listens on a free port instead of 32768 (the blocks'
``localhost:32768`` is pointed at it), and the tools find it the way they find
the node of this machine, through ``QUORUM_PORT`` and ``QUORUM_DATA_DIR``.

A section whose first example needs other machines (a cluster, a relay, a
sharded model) or is not a command (a config file) is named in ``NOT_HERE``
with the reason; the test fails on a section it does not know what to do
with, so a new section's first example is run, or said not to be.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import QN, clean_env, eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180, func_only=True)]

README = Path(__file__).resolve().parents[2] / "README.md"
#: Sections whose first example is not run here, and why.
NOT_HERE = {
    "Configuration": "a config file, not a command",
    "A cluster on your LAN": "needs a second machine (tests/cluster/test_cluster_cli.py runs these commands)",
    "A model bigger than one machine: sharding": "needs other members (tests/integration/test_sharding.py)",
    "A cluster across networks: the relay": "needs a relay on a VPS (tests/cluster/test_wan.py)",
}
_BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)


def examples() -> list[tuple[str, str, str]]:
    """``(where, language, code)``: the quick start's blocks, then each section's first."""
    text = README.read_text()
    parts = re.split(r"(?m)^## (.*)$", text)
    out = [("quick start", lang, code) for lang, code in _BLOCK.findall(parts[0])]
    out = [b for b in out if not b[2].lstrip().startswith("scripts/run")]  # the set-up itself
    for title, body in zip(parts[1::2], parts[2::2], strict=True):
        first = _BLOCK.search(body)
        if first is not None and title not in NOT_HERE:
            out.append((title, first.group(1), first.group(2)))
    return out


def test_every_section_s_first_example_is_run_or_said_not_to_be() -> None:
    parts = re.split(r"(?m)^## (.*)$", README.read_text())
    with_examples = {t for t, body in zip(parts[1::2], parts[2::2], strict=True) if _BLOCK.search(body)}
    assert set(NOT_HERE) <= with_examples, set(NOT_HERE) - with_examples  # no stale exception
    ran = {where for where, _, _ in examples()}
    assert with_examples - set(NOT_HERE) <= ran
    assert "quick start" in ran and {"The Ollama API", "API keys"} <= ran


def commands(code: str) -> str:
    """A shell block as pasted: a transcript (``$ command`` lines, then what it printed) gives its commands."""
    said = [line[2:] for line in code.splitlines() if line.startswith("$ ")]
    return "\n".join(said) if said else code


async def run(lang: str, code: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    shell = lang in ("bash", "sh", "")
    argv = ["bash", "-e", "-c", commands(code)] if shell else [sys.executable, "-c", code]
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def test_the_readme_runs_as_written(start_node: Any, cache: Path, llama_server: Path, tmp_path: Path) -> None:
    with socket.socket() as nobody:  # detection finds nothing: the embedded engine serves, as on a first run
        nobody.bind(("127.0.0.1", 0))
        node = await start_node(
            detect=True, detect_ports=[nobody.getsockname()[1]], embedded_engine=True, cache_dir=str(cache)
        )

        async def ready() -> bool:
            return node.router.known_models() != []

        await eventually(ready, "the embedded engine serves", timeout_s=120)
        env = {
            **clean_env(),
            "PATH": f"{Path(QN).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # quorum-node, as installed
            "QUORUM_PORT": str(node.port),
            "QUORUM_DATA_DIR": node.settings.data_dir,
        }
        ran = []
        for where, lang, code in examples():
            pasted = code.replace("localhost:32768", f"localhost:{node.port}")
            rc, out, err = await run(lang, pasted, env, tmp_path)
            assert rc == 0, f"README, {where} ({lang}), exit {rc}:\n{code}\n--- stdout\n{out}\n--- stderr\n{err}"
            assert out.strip(), f"README, {where}: printed nothing\n{code}\n--- stderr\n{err}"
            ran.append(where)
        print(f"ran the README's examples: {ran}")
