"""`quorum-node cluster init|join|show` as a person runs them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

QN = [sys.executable, "-m", "quorum_node.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*QN, *args], capture_output=True, text=True, timeout=30, env={**os.environ})


def test_init_prints_token_that_joins_the_same_cluster(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    init = run("cluster", "--data-dir", str(a), "init", "--name", "home")
    assert init.returncode == 0, init.stderr
    token = next(w for w in init.stdout.split() if w.startswith("qrm1."))
    joined = run("cluster", "--data-dir", str(b), "join", token)
    assert joined.returncode == 0, joined.stderr
    show_a = run("cluster", "--data-dir", str(a), "show").stdout
    show_b = run("cluster", "--data-dir", str(b), "show").stdout
    assert "home" in show_a and show_a == show_b  # same name, same fingerprint
    secret_part = token.split(".")[2]
    assert secret_part not in show_a  # show never prints the secret
    files = [p for p in a.iterdir() if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)


def test_init_twice_refuses_without_force(tmp_path: Path) -> None:
    assert run("cluster", "--data-dir", str(tmp_path), "init").returncode == 0
    again = run("cluster", "--data-dir", str(tmp_path), "init")
    assert again.returncode == 1 and "--force" in again.stderr
    assert run("cluster", "--data-dir", str(tmp_path), "init", "--force").returncode == 0


def test_bad_token_is_a_clear_error(tmp_path: Path) -> None:
    bad = run("cluster", "--data-dir", str(tmp_path), "join", "not-a-token")
    assert bad.returncode == 2
    assert bad.stderr.startswith("quorum-node: ") and len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr


def test_show_without_cluster(tmp_path: Path) -> None:
    r = run("cluster", "--data-dir", str(tmp_path), "show")
    assert r.returncode == 1 and "cluster init" in r.stderr
