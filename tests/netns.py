"""Network namespaces for tests: whether this machine allows them (root, Linux, iproute2), and one joined
to this one by a veth pair."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

__all__ = ["netns_unavailable", "other_namespace", "require_netns"]


def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 ('ip')"
    probe = f"qprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def require_netns(what: str) -> None:
    """Skip the test where namespaces cannot be made, except under CI: CI runs as root with iproute2
    (``scripts/test`` installs it), so there a missing namespace is a failure, never a silent skip."""
    why = netns_unavailable()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} needs network namespaces: {why}")
    pytest.skip(why)


@contextlib.contextmanager
def other_namespace(tag: str, subnet: str = "10.79.1") -> Iterator[tuple[str, str]]:
    """A network namespace joined to this one by a veth pair: its name, and this side's address
    (``subnet``.1). Its end is ``subnet``.2: a caller there reaches a server bound to ``subnet``.1 off
    loopback, for real (``require_netns``). Removed afterwards."""
    require_netns("this test")
    ns, host_if = f"q{tag}{os.getpid()}", f"q{tag}{os.getpid()}h"

    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True)

    run("ip", "netns", "add", ns)
    try:
        run("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "addr", "add", f"{subnet}.1/30", "dev", host_if)
        run("ip", "link", "set", host_if, "up")
        run("ip", "-n", ns, "addr", "add", f"{subnet}.2/30", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        yield ns, f"{subnet}.1"
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
