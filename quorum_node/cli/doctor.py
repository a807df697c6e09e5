"""``quorum-node doctor``: what is wrong with this machine's node, and the fix (``control/doctor.py``)."""

from __future__ import annotations

import argparse
import json
import urllib.error
from typing import Any

from ..errors import ApiError
from ..settings import Settings
from .common import NoNode, admin_request, node_options, node_url

__all__ = ["add_doctor_command", "cmd_doctor"]

_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


def add_doctor_command(sub: Any) -> None:
    p = sub.add_parser(
        "doctor",
        help="check this node's setup: engines, ports, mDNS, peers, clocks, relay, keys; and say how to fix it",
        description="Checks what the node on this machine sees of its setup, and explains each problem with "
        "its fix. Exit status 1 when a check fails.",
    )
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    node_options(p)
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    url = node_url(args, settings)
    try:
        data = admin_request(settings, url, "GET", "/quorum/admin/doctor", timeout_s=30)
        findings: list[dict[str, Any]] = data["findings"]
    except ApiError as e:
        findings = [{"check": "node", "status": "fail", "message": f"{url}: {e.message}", "fix": ""}]
    except (NoNode, urllib.error.URLError, OSError) as e:
        findings = [
            {
                "check": "node",
                "status": "fail",
                "message": f"no node answers at {url} ({e})",
                "fix": "start it: quorum-node run (or scripts/run); another port: --url",
            }
        ]
    if args.json:
        print(json.dumps({"findings": findings}, indent=2))
    else:
        for f in findings:
            print(f"{_MARK.get(f['status'], f['status'])}  {f['check']:<10} {f['message']}")
            if f.get("fix") and f["status"] != "ok":
                print(f"{'':16}fix: {f['fix']}")
        problems = [f for f in findings if f["status"] != "ok"]
        print(f"\n{len(problems)} problem(s)" if problems else "\nno problem found")
    return 1 if any(f["status"] == "fail" for f in findings) else 0
