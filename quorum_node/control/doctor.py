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
  else); and dialled back by each member it reaches on the LAN
  (``DOCTOR_PATH``): a firewall in front of this node, or a NAT (Docker, WSL)
  that hides it, shows there as a port the member cannot open;
- **mdns**: on each interface it multicasts on, whether this node hears its
  own advertisement (``Discovery.hears_itself``): a firewall dropping
  5353/udp, or an interface without multicast, is named here;
- **peers**: the members this node sees, against those it knows (multicast
  blocked on the way, a Docker or WSL network, a node not running);
- **clock**: each member's clock, as it answers the same call (API keys
  expire and usage is dated by each machine's own clock);
- **relay**: the relay link's state (a refused token, a certificate this
  machine does not trust, unreachable), and whether each member asked above
  sees this node on its relay (two namespaces, or two relays, do not meet);
- **network**: signs of a NAT between this node and the LAN (WSL 2, a Docker
  container on Docker's network);
- **keys**: ``--require-key`` with no key a caller could use.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import structlog

from ..backends.base import BackendState
from ..cluster.context import PeerCallError
from ..names import is_loopback

__all__ = ["CLOCK_SKEW_S", "DOCTOR_PATH", "DialBack", "DialedBack", "Dialled", "Facts", "Finding", "dial", "examine"]

#: ``POST`` on a member, by a member (``api/peer.py``): dial me back on these ports, and say your clock.
DOCTOR_PATH = "/quorum/v1/doctor"

#: Clocks further apart than this are a problem (the records' and relay proofs' windows are minutes).
CLOCK_SKEW_S = 30.0
_DIAL_S = 1.0
_ASK = 32  # members asked to dial back at most
_ASK_S = 6.0  # how long one has to answer (it dials for 1 s at most; a busy machine is slow)

log = structlog.get_logger(__name__)
_encode = msgspec.json.Encoder().encode

Status = Literal["ok", "warn", "fail"]


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    check: str
    status: Status
    message: str
    fix: str = ""


class DialBack(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A member asks: open these ports of mine, at the address my request came from."""

    ports: Annotated[list[Annotated[int, msgspec.Meta(ge=1, le=65535)]], msgspec.Meta(max_length=4)]


class Dialled(msgspec.Struct, frozen=True, kw_only=True):
    port: int
    error: str | None = None  # None: it opened


class DialedBack(msgspec.Struct, frozen=True, kw_only=True):
    """The member's answer: its clock, and what it could open (``address`` None: it came over the relay)."""

    now: float
    address: str | None = None
    dialled: Annotated[list[Dialled], msgspec.Meta(max_length=4)] = []
    # whether the member sees the asker online on its relay (None: it is on no relay)
    on_relay: bool | None = None


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


async def dial(host: str, port: int) -> str | None:
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


def _local_only(host: str) -> bool:
    """The API is bound to this machine's loopback only."""
    return host == "localhost" or is_loopback(host)


async def _reachable(f: Facts) -> list[Finding]:
    host = f.settings.host
    if _local_only(host):
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
    dials = [(address, what, port) for address in f.lan_addresses for what, port in ports]
    said = await asyncio.gather(*(dial(address, port) for address, _, port in dials))  # 1 s each at most
    for (address, what, port), why in zip(dials, said, strict=True):
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


async def _mdns(f: Facts) -> list[Finding]:
    discovery = f.cluster.discovery if f.cluster is not None else None
    if f.cluster is None:
        return []
    if discovery is None:
        return [Finding(check="mdns", status="ok", message="mDNS is off: members are named (--peer) or on the relay")]
    out = []
    addresses = discovery.addresses
    heard = await asyncio.gather(*(discovery.hears_itself(a) for a in addresses))  # each waits up to 2 s
    for address, hears in zip(addresses, heard, strict=True):
        if hears:
            out.append(Finding(check="mdns", status="ok", message=f"mDNS on {address}: this node hears itself"))
        else:
            out.append(
                Finding(
                    check="mdns",
                    status="fail",
                    message=f"mDNS on {address}: this node's own announcement does not come back: multicast is "
                    "dropped on this machine (a firewall on 5353/udp?), so no member on this LAN finds it",
                    fix="let 5353/udp in and out (ufw allow 5353/udp; nft add rule inet filter input udp dport "
                    "5353 accept), or name members with --peer HOST:PORT, or join both to a relay",
                )
            )
    return out


async def _ask(f: Facts, peer: Any, ports: list[int]) -> list[Finding]:
    """One member dials this node back and says its clock (``DOCTOR_PATH``): findings of both."""
    cluster = f.cluster
    assert cluster is not None
    name = peer.info.name or peer.node_id[:12]
    sent = time.time()
    try:
        raw = await cluster.call(peer.node_id, DOCTOR_PATH, _encode(DialBack(ports=ports)), timeout_s=_ASK_S)
        answer = msgspec.json.decode(raw, type=DialedBack)
    except PeerCallError as e:
        if e.status == 404:  # a node of an older version: it has nothing to say
            return []
        why = str(e)
    except (OSError, TimeoutError, ValueError) as e:
        why = str(e) or type(e).__name__
    else:
        why = ""
    if why:
        log.info("doctor_ask_failed", peer=peer.node_id, error=why)
        return [
            Finding(
                check="peers",
                status="warn",
                message=f"{name} is up, yet did not answer this node's check (its ports and clock): {why[:200]}",
                fix="run quorum-node doctor there too; a slow or overloaded machine answers late",
            )
        ]
    out = []
    got = time.time()
    skew = answer.now - (sent + got) / 2
    if not math.isfinite(skew):
        return []
    if abs(skew) > CLOCK_SKEW_S + (got - sent):
        out.append(
            Finding(
                check="clock",
                status="fail",
                message=f"{name}'s clock is {skew:+.0f} s from this machine's (API keys expire, and usage is "
                "dated, by each machine's own clock)",
                fix="turn on time sync (NTP) on both machines: timedatectl set-ntp true",
            )
        )
    else:
        out.append(Finding(check="clock", status="ok", message=f"{name}'s clock agrees (within {abs(skew):.0f} s)"))
    relay = cluster.relay
    if relay is not None and relay.state == "up" and answer.on_relay is False:
        out.append(
            Finding(
                check="relay",
                status="warn",
                message=f"{name} does not see this node on its relay, though both are connected (another relay, "
                "or a token of another namespace?)",
                fix="give every member the same --relay URL and a token of the same namespace",
            )
        )
    if answer.address is None:  # over the relay: it cannot tell whether the LAN reaches this node
        return out
    what = {f.port: "API", f.peer_port: "peer"}
    for d in answer.dialled[: len(ports)]:
        where = f"{what.get(d.port, 'port')} port {d.port}"
        if d.error is None:
            out.append(Finding(check="reachable", status="ok", message=f"{name} reaches this node's {where}"))
        else:
            out.append(
                Finding(
                    check="reachable",
                    status="fail",
                    message=f"{name} cannot open this node's {where} at {answer.address}: {d.error[:200]}",
                    fix=f"let TCP {d.port} in through this machine's firewall (ufw allow {d.port}/tcp); behind "
                    "Docker or WSL NAT, publish the port (docker run -p) or use the host's network",
                )
            )
    return out


async def _from_peers(f: Facts) -> list[Finding]:
    """Each member up now, or late with one answer (at most ``_ASK``), asked at once."""
    cluster = f.cluster
    if cluster is None:
        return []
    ports = [p for p in (f.peer_port, f.port) if p]
    if _local_only(f.settings.host):
        ports = ports[:1]  # the API is this machine's only (said above): the peer port is what members need
    peers = [p for p in cluster.table.all() if p.state.value in ("up", "suspect")][:_ASK]  # suspect: late once
    found = await asyncio.gather(*(_ask(f, p, ports) for p in peers))
    return [finding for each in found for finding in each]


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
    if "CERTIFICATE_VERIFY_FAILED" in (relay.last_error or ""):
        return [
            Finding(
                check="relay",
                status="fail",
                message=f"{f.settings.relay}: its TLS certificate is not valid for this machine: {relay.last_error}",
                fix="give the relay a certificate of a CA this machine trusts, for the name in the URL (Let's "
                "Encrypt, or SSL_CERT_FILE naming your own CA)",
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


def _environment(proc_version: Path = Path("/proc/version"), dockerenv: Path = Path("/.dockerenv")) -> list[Finding]:
    """WSL 2 and Docker's bridge network put a NAT between the node and the LAN: peers cannot open its ports
    nor hear its mDNS, whatever this machine's own checks say."""
    try:
        version = proc_version.read_text(errors="replace")[:4096].lower()
    except OSError:
        version = ""
    if "microsoft" in version or "wsl" in version:
        return [
            Finding(
                check="network",
                status="warn",
                message="this is WSL: its network is behind a NAT of Windows, so other machines cannot reach "
                "this node's ports, and its mDNS does not reach the LAN",
                fix="turn on mirrored networking (networkingMode=mirrored in %UserProfile%\\.wslconfig, "
                "Windows 11), or run quorum-node on Windows itself, or join the cluster through a relay",
            )
        ]
    if dockerenv.exists():
        return [
            Finding(
                check="network",
                status="warn",
                message="this node runs in a Docker container: on Docker's own network, the LAN cannot reach "
                "its ports and multicast (mDNS) does not cross",
                fix="run the container with --network host; or publish both ports (-p 32768:32768 -p "
                "32769:32769) and name members with --peer HOST:PORT, or join through a relay",
            )
        ]
    return []


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
    from_peers = asyncio.ensure_future(_from_peers(facts))  # while mDNS listens for itself
    found = [*_engines(facts), *await _reachable(facts), *await _mdns(facts), *_peers(facts)]
    found += await from_peers
    # a NAT of WSL or Docker is named where it shows: a member cannot reach this node, or none is seen
    if any(f.status != "ok" and f.check in ("reachable", "mdns", "peers") for f in found):
        found += _environment()
    return [*found, *_relay(facts), *_keys(facts)]
