"""``quorum-node doctor``: what is wrong with this node's setup, in words a user can act on (issue 23).

The running node looks at itself and answers ``GET /quorum/admin/doctor``
(``api/admin.py``); the command prints it (``--json`` for scripts). Each
finding is one check, ``ok``, ``warn`` or ``fail``, what it saw, and for the
others the fix. The checks, each bounded in time:

- **engines**: every engine named or found, whether it is ready and with how
  many models; a default port where something answers that is no engine
  (Open WebUI on 8080), and what to do if it is one;
- **reachable**: the API port and the peer port, dialled on each address the
  node has on the LAN (a node bound to loopback only is reachable from nowhere
  else; a firewall in between shows as a refused or silent port);
- **peers**: the members this node sees, against those it knows (multicast
  blocked, a Docker or WSL network, a node not running);
- **clock**: each reachable peer's clock, from the ``Date`` of its health
  answer (signed records have a time window);
- **relay**: the relay link's state (a refused token, TLS, unreachable);
- **keys**: ``--require-key`` with no key a caller could use.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import msgspec

from ..backends.base import BackendState

__all__ = ["CLOCK_SKEW_S", "Facts", "Finding", "examine"]

#: Clocks further apart than this are a problem (the records' and relay proofs' windows are minutes).
CLOCK_SKEW_S = 30.0
_DIAL_S = 1.0

Status = Literal["ok", "warn", "fail"]


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    check: str
    status: Status
    message: str
    fix: str = ""


@dataclass
class Facts:
    """What ``examine`` reads of the node (``node.py`` hands it)."""

    settings: Any
    registry: Any
    cluster: Any | None
    keys: Any
    port: int
    peer_port: int
    lan_addresses: Sequence[str]


async def _dial(host: str, port: int) -> str | None:
    """None where a TCP connection opens within ``_DIAL_S``; else why not."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), _DIAL_S)
    except TimeoutError:
        return "no answer (a firewall dropping it?)"
    except OSError as e:
        return e.strerror or str(e)
    writer.close()
    return None


def _engines(f: Facts) -> list[Finding]:
    out = []
    backends = list(f.registry.backends.values())
    for b in backends:
        if b.state is BackendState.READY:
            out.append(
                Finding(check="engines", status="ok", message=f"{b.name} ({b.kind}): ready, {len(b.models)} models")
            )
        else:
            out.append(
                Finding(
                    check="engines",
                    status="fail",
                    message=f"{b.name} ({b.kind}) at {b.url}: {b.state.value}: {b.last_error or 'no answer'}",
                    fix="start the engine, or correct its URL (--backend KIND=URL)",
                )
            )
    for url in f.registry.not_engines():
        out.append(
            Finding(
                check="engines",
                status="warn",
                message=f"something answers at {url}, but it is no engine this node knows (a web app?)",
                fix=f"if it is an engine, name it: --backend KIND={url} (ollama, llamacpp, vllm, ...)",
            )
        )
    if not backends and f.settings.embedded_engine is False:
        out.append(
            Finding(
                check="engines",
                status="warn",
                message="no engine on this machine, and the embedded one is off",
                fix="start an engine, name one with --backend, or drop --no-embedded-engine",
            )
        )
    return out


async def _reachable(f: Facts) -> list[Finding]:
    host = f.settings.host
    if host in ("127.0.0.1", "::1", "localhost"):
        if f.cluster is None:  # one machine on its own: as meant
            return [Finding(check="reachable", status="ok", message=f"the API listens on {host}: this machine only")]
        return [
            Finding(
                check="reachable",
                status="warn",
                message=f"the API listens on {host} only: no other machine can reach it",
                fix="run with --host 0.0.0.0 to serve the LAN (keys protect it: see API keys)",
            )
        ]
    out = []
    ports = [("API", f.port)] + ([("peer", f.peer_port)] if f.peer_port else [])
    for address in f.lan_addresses:
        for what, port in ports:
            why = await _dial(address, port)
            if why is None:
                out.append(Finding(check="reachable", status="ok", message=f"{what} port {address}:{port} answers"))
            else:
                out.append(
                    Finding(
                        check="reachable",
                        status="fail",
                        message=f"{what} port {address}:{port}: {why}",
                        fix=f"let TCP {port} in through this machine's firewall (ufw allow {port}/tcp)",
                    )
                )
    return out


def _peers(f: Facts) -> list[Finding]:
    cluster = f.cluster
    if cluster is None:
        return [Finding(check="peers", status="ok", message="not in a cluster: nothing to see")]
    members = [r for r in cluster.members.rows(cluster.node_id) if not r["self"]]
    seen = {p.node_id: p for p in cluster.table.all()}
    out = []
    for m in members:
        peer = seen.get(m["node_id"])
        if peer is not None and peer.state.value == "up":
            via = "relay" if not peer.info.address else peer.info.address
            out.append(Finding(check="peers", status="ok", message=f"{m['name']} is up ({via})"))
            continue
        out.append(
            Finding(
                check="peers",
                status="warn",
                message=f"{m['name']} ({m['node_id'][:12]}) is a member this node does not reach"
                + (f": {peer.state.value}" if peer is not None else ": never seen"),
                fix="is its node running? If it is: mDNS may not cross this network (multicast blocked, Docker "
                "or WSL NAT): name it with --peer HOST:PORT, or join both to a relay",
            )
        )
    return out


async def _clock(f: Facts, session: aiohttp.ClientSession) -> list[Finding]:
    cluster = f.cluster
    if cluster is None:
        return []
    out = []
    for peer in cluster.table.all():
        ctx = cluster.tls.client_for(peer.node_id) if peer.info.address else None
        if ctx is None or peer.state.value != "up":
            continue
        try:
            async with session.get(
                f"https://{peer.info.address}/quorum/v1/health",
                ssl=ctx,
                headers=cluster.peer_headers(),
                timeout=aiohttp.ClientTimeout(total=2 * _DIAL_S),
            ) as resp:
                said = resp.headers.get("Date")
        except (aiohttp.ClientError, OSError, TimeoutError):
            continue
        theirs = email.utils.parsedate_to_datetime(said).timestamp() if said else None
        if theirs is None:
            continue
        skew = theirs - time.time()
        name = peer.info.name or peer.node_id[:12]
        if abs(skew) > CLOCK_SKEW_S:
            out.append(
                Finding(
                    check="clock",
                    status="fail",
                    message=f"{name}'s clock is {skew:+.0f} s from this machine's",
                    fix="turn on time sync (NTP: timedatectl set-ntp true) on both machines",
                )
            )
        else:
            out.append(Finding(check="clock", status="ok", message=f"{name}'s clock agrees (within {abs(skew):.0f} s)"))
    return out


def _relay(f: Facts) -> list[Finding]:
    cluster = f.cluster
    relay = cluster.relay if cluster is not None else None
    if not f.settings.relay:
        return []
    if relay is None:
        return [Finding(check="relay", status="fail", message="a relay is set, but this node is in no cluster",
                        fix="join a cluster first (quorum-node join)")]  # fmt: skip
    if relay.state == "up":
        return [Finding(check="relay", status="ok", message=f"connected to {f.settings.relay}; online there: "
                        f"{len(relay.online)} other members")]  # fmt: skip
    if relay.state == "refused":
        return [
            Finding(
                check="relay",
                status="fail",
                message=f"{f.settings.relay} refused this node: {relay.last_error or 'its token'}",
                fix="check --relay-token: it must be one of the tokens the relay was started with",
            )
        ]
    return [
        Finding(
            check="relay",
            status="fail",
            message=f"{f.settings.relay}: {relay.state}: {relay.last_error or 'not connected'}",
            fix="check the relay's URL (wss:// with a valid certificate), that it runs, and that this machine "
            "reaches it",
        )
    ]


def _keys(f: Facts) -> list[Finding]:
    now = time.time()
    usable = [k for k in f.keys.list() if not k.revoked and (k.expires is None or k.expires > now)]
    if f.settings.require_key and not usable:
        return [
            Finding(
                check="keys",
                status="warn",
                message="--require-key is on and there is no active API key: every caller is refused",
                fix="quorum-node keys create --name NAME",
            )
        ]
    return []


async def examine(facts: Facts) -> list[Finding]:
    """Every check, in order; none raises."""
    async with aiohttp.ClientSession() as session:
        return [
            *_engines(facts),
            *await _reachable(facts),
            *_peers(facts),
            *await _clock(facts, session),
            *_relay(facts),
            *_keys(facts),
        ]
