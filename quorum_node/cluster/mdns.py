"""LAN discovery over mDNS/DNS-SD (python-zeroconf).

Each node advertises ``<node_id>._quorum._tcp.local.`` with a small TXT record
and browses for the same type. What it hears becomes ``DiscoveryEvent`` values
handed to ``on_event``::

    announcement of a new service   ──resolve──►  Discovered(info)
    TXT (or address) of it changed  ──resolve──►  Updated(info)
    goodbye (TTL 0) or expiry       ───────────►  Gone(node_id)

The service's port is the node's *peer port* (mutual TLS, ``tls.py``). TXT keys
(short, because the whole record travels in every announcement):

    id    node id            v     protocol version
    port  the peer port      cat   catalog digest
    name  node name (truncated to NAME_MAX_BYTES)

The record says only *where* a node may be and *whether* its catalog changed,
never whom to trust, and nothing an outsider could use (no cluster name or
fingerprint). Strangers are not filtered here: the cluster service acts only
on members' announcements, and checks each over a link pinned to that member.

Browser callbacks run inside zeroconf's record processing and only enqueue;
one consumer task resolves services (from the cache, or with a short query)
and calls ``on_event``. ``on_event`` must not block (``queue.put_nowait`` is
the intended shape).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ifaddr
import msgspec
import structlog
from zeroconf import (
    BadTypeInNameException,
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from quorum_node.cluster.peers import PeerInfo
from quorum_node.names import NAME_PATTERN, NODE_ID_PATTERN

__all__ = [
    "NAME_MAX_BYTES",
    "SERVICE_TYPE",
    "Discovered",
    "Discovery",
    "DiscoveryEvent",
    "Gone",
    "Updated",
    "peer_info_from_txt",
    "pick_address",
    "txt_properties",
]

log = structlog.get_logger(__name__)

SERVICE_TYPE = "_quorum._tcp.local."
NAME_MAX_BYTES = 63
"""A TXT string holds at most 255 bytes; a node name needs far fewer."""

_RESOLVE_RETRY_DELAYS_S = (1.0, 2.0, 4.0)


class Discovered(msgspec.Struct, frozen=True, kw_only=True):
    """A peer's service appeared and was resolved."""

    info: PeerInfo


class Updated(msgspec.Struct, frozen=True, kw_only=True):
    """A known peer re-announced with different details (catalog digest, address …)."""

    info: PeerInfo


class Gone(msgspec.Struct, frozen=True, kw_only=True):
    """A peer withdrew its service (goodbye) or its records expired; ``address``: where that service said it
    was (anyone can announce any id, and then say goodbye for it)."""

    node_id: str
    address: str = ""


DiscoveryEvent = Discovered | Updated | Gone


# Pure helpers -------------------------------------------------------------


def _truncate_utf8(text: str, max_bytes: int) -> str:
    return text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def txt_properties(
    *, node_id: str, name: str, port: int, fingerprint: str, proto: int, catalog_digest: str
) -> dict[str, str]:
    """The TXT record this node advertises."""
    props = {
        "id": node_id,
        "v": str(proto),
        "port": str(port),
        "cat": catalog_digest,
        "name": _truncate_utf8(name, NAME_MAX_BYTES),
    }
    if fingerprint:  # nodes of before keys announced their cluster's
        props["fp"] = fingerprint
    return props


_TXT_NAME = re.compile(NAME_PATTERN)
_TXT_NODE_ID = re.compile(NODE_ID_PATTERN)
_TXT_TOKEN = re.compile(r"\A[^\x00-\x1f\x7f]{0,128}\Z")


def peer_info_from_txt(props: Mapping[str, str | None], service: str, address: str) -> PeerInfo | None:
    """A peer as its TXT record describes it, reached at ``address``; None (logged) for a record whose
    id, name, fingerprint or catalog digest is not printable and bounded (``names.py``): such a name
    would break the headers and log lines it goes into."""
    node_id = props.get("id") or service.removesuffix("." + SERVICE_TYPE)
    name = props.get("name") or ""
    fingerprint = props.get("fp") or ""
    digest = props.get("cat") or ""
    if not (
        _TXT_NODE_ID.match(node_id)
        and _TXT_NAME.match(name)
        and _TXT_TOKEN.match(fingerprint)
        and _TXT_TOKEN.match(digest)
    ):
        log.warning("mdns_peer_rejected", service=service[:300], reason="a TXT value that is no printable name")
        return None
    try:
        proto = int(props.get("v") or 1)
    except ValueError:
        proto = 0  # unparseable: never equal to a version we speak
    return PeerInfo(
        node_id=node_id,
        name=name,
        address=address,
        route="lan",
        fingerprint=fingerprint,
        proto=proto,
        catalog_digest=digest,
    )


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse_ips(texts: Sequence[str]) -> list[_IP]:
    out: list[_IP] = []
    for text in texts:
        try:
            out.append(ipaddress.ip_address(text))
        except ValueError:
            continue
    return out


def _common_prefix_bits(a: _IP, b: _IP) -> int:
    if a.version != b.version:
        return -1
    diff = int(a) ^ int(b)
    return a.max_prefixlen - diff.bit_length()


def pick_address(candidates: Sequence[str], own: Sequence[str]) -> str | None:
    """Choose which of a peer's advertised IPs to dial.

    IPv4 before IPv6, routable before link-local, and among those the one
    sharing the longest prefix with one of this node's own addresses — a
    multi-homed peer (Docker bridge, VPN) most likely shares our LAN on that one.
    Ties keep the advertised order.
    """
    parsed = [a for a in _parse_ips(candidates) if not a.is_unspecified and not a.is_multicast]
    if not parsed:
        return None
    mine = _parse_ips(own)

    def rank(item: tuple[int, _IP]) -> tuple[int, int, int, int]:
        index, addr = item
        closeness = max((_common_prefix_bits(addr, m) for m in mine), default=0)
        return (addr.version, int(addr.is_link_local), -closeness, index)

    return str(min(enumerate(parsed), key=rank)[1])


def _host_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def lan_addresses(interfaces: Sequence[str] = ()) -> list[str]:
    """This machine's addresses on its networks (``interfaces`` where given): what it advertises."""
    if interfaces:
        return list(interfaces)
    out = []
    # every IPv4 address of every adapter, once (what zeroconf's deprecated get_all_addresses gave)
    for text in dict.fromkeys(
        ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if isinstance(ip.ip, str)
    ):
        addr = ipaddress.ip_address(text)
        if not (addr.is_loopback or addr.is_link_local or addr.is_unspecified):
            out.append(text)
    return out


def _packed(ip: str) -> bytes:
    addr = ipaddress.ip_address(ip)
    return socket.inet_pton(socket.AF_INET6 if addr.version == 6 else socket.AF_INET, str(addr))


# The I/O side -------------------------------------------------------------

_Change = tuple[str, ServiceStateChange, int]  # service name, change, attempt


class Discovery:
    """Advertise this node and report peers seen on the LAN.

    ``interfaces`` empty means every interface (production); otherwise the
    listed IPs are the only ones zeroconf binds, multicasts on and advertises
    (tests pass ``["127.0.0.1"]``; a network namespace passes its bridge address).
    """

    def __init__(
        self,
        *,
        node_id: str,
        name: str,
        port: int,
        fingerprint: str,
        proto: int = 1,
        catalog_digest: str = "",
        interfaces: Sequence[str] = (),
        on_event: Callable[[DiscoveryEvent], None],
        resolve_timeout_s: float = 1.5,
    ) -> None:
        self.node_id = node_id
        self.name = name
        self.port = port
        self.fingerprint = fingerprint
        self.proto = proto
        self.catalog_digest = catalog_digest
        self.interfaces = tuple(str(ipaddress.ip_address(ip)) for ip in interfaces)
        self.on_event = on_event
        self.resolve_timeout_s = resolve_timeout_s
        self.instance_name = f"{node_id}.{SERVICE_TYPE}"
        self._server = f"quorum-{node_id}.local."
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._registered = False
        self._own_addresses: list[str] = []
        self._changes: asyncio.Queue[_Change] = asyncio.Queue()
        self._consumer: asyncio.Task[None] | None = None
        self._broadcasts: set[asyncio.Future[object]] = set()
        self._retries: set[asyncio.TimerHandle] = set()
        self._known: dict[str, PeerInfo] = {}  # service name -> what we last reported
        self._lock = asyncio.Lock()
        self._started = False
        self._closed = False

    @property
    def addresses(self) -> list[str]:
        """The addresses this node advertises (and so the interfaces it multicasts on)."""
        return list(self._own_addresses)

    async def hears_itself(self, address: str, timeout_s: float = 2.0) -> bool:
        """Whether a query sent on ``address``'s interface comes back answered by this node's own
        advertisement: multicast goes out there and comes in (``quorum-node doctor``). A fresh responder
        on that interface asks (answers multicast, so that every listener there hears them)."""
        from zeroconf import DNSQuestionType

        v6 = ipaddress.ip_address(address).version == 6
        probe = AsyncZeroconf(interfaces=[address], ip_version=IPVersion.V6Only if v6 else IPVersion.V4Only)
        try:
            info = AsyncServiceInfo(SERVICE_TYPE, self.instance_name)
            return bool(
                await info.async_request(probe.zeroconf, int(timeout_s * 1000), question_type=DNSQuestionType.QM)
            )
        except OSError:
            return False
        finally:
            await probe.async_close()

    async def start(self) -> None:
        """Open the sockets, start browsing and advertise this node (takes ~1-2 s of probing)."""
        async with self._lock:
            if self._started or self._closed:
                raise RuntimeError("Discovery.start() may be called once")
            self._started = True
            if self.interfaces:
                v6 = any(ipaddress.ip_address(ip).version == 6 for ip in self.interfaces)
                self._aiozc = AsyncZeroconf(
                    interfaces=list(self.interfaces), ip_version=IPVersion.All if v6 else IPVersion.V4Only
                )
            else:
                self._aiozc = AsyncZeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
            advertised = lan_addresses(self.interfaces)
            self._own_addresses = advertised
            self._consumer = asyncio.create_task(self._consume(), name="mdns-consumer")
            self._browser = AsyncServiceBrowser(self._aiozc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
            self._info = self._service_info(advertised)
            if not advertised:
                log.warning("mdns_no_address", hint="no non-loopback address to advertise; peers cannot reach us")
            try:
                broadcast = await self._aiozc.async_register_service(self._info)
            except (NonUniqueNameException, BadTypeInNameException) as exc:
                # Another node answers for our id (a copied data dir?) or the id is no DNS label:
                # keep browsing, stay unadvertised; static peers still work.
                log.error("mdns_register_failed", instance=self.instance_name, error=repr(exc))
            else:
                self._registered = True
                self._track(asyncio.ensure_future(broadcast))  # a Task already (zeroconf types it Awaitable)
            log.info(
                "mdns_started",
                instance=self.instance_name,
                addresses=advertised,
                interfaces=list(self.interfaces) or "all",
                registered=self._registered,
            )

    async def update_catalog_digest(self, digest: str) -> None:
        """Re-announce the TXT record with a new catalog digest (peers see it at once)."""
        async with self._lock:
            self.catalog_digest = digest
            if self._closed or not self._registered or self._aiozc is None or self._info is None:
                return
            self._info = self._service_info(self._info.parsed_addresses())
            self._track(asyncio.ensure_future(await self._aiozc.async_update_service(self._info)))
            log.info("mdns_catalog_announced", catalog_digest=digest)

    async def close(self) -> None:
        """Say goodbye (peers drop us at once), stop browsing, close the sockets. Idempotent."""
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            for handle in self._retries:
                handle.cancel()
            self._retries.clear()
            try:
                await self._cancel(self._consumer, *self._broadcasts)
                if self._aiozc is not None:
                    if self._registered and self._info is not None:
                        await (await self._aiozc.async_unregister_service(self._info))
                    if self._browser is not None:
                        await self._browser.async_cancel()
            finally:
                if self._aiozc is not None:
                    await self._aiozc.async_close()
                log.info("mdns_closed", instance=self.instance_name)

    def known(self) -> list[PeerInfo]:
        """Every service heard and not gone, as last reported (members or not: the cluster decides)."""
        return list(self._known.values())

    # Internals ----------------------------------------------------------

    def _service_info(self, addresses: Sequence[str]) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE,
            self.instance_name,
            port=self.port,
            properties=txt_properties(
                node_id=self.node_id,
                name=self.name,
                port=self.port,
                fingerprint=self.fingerprint,
                proto=self.proto,
                catalog_digest=self.catalog_digest,
            ),
            server=self._server,
            addresses=[_packed(ip) for ip in addresses],
        )

    def _track(self, fut: asyncio.Future[object]) -> None:
        self._broadcasts.add(fut)
        fut.add_done_callback(self._broadcasts.discard)

    @staticmethod
    async def _cancel(*futs: asyncio.Future[Any] | None) -> None:
        pending = [f for f in futs if f is not None and not f.done()]
        for f in pending:
            f.cancel()
        if pending:
            await asyncio.wait(pending)

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        # Called from zeroconf's record processing on the event loop: enqueue, nothing else.
        self._changes.put_nowait((name, state_change, 0))

    def _retry(self, name: str, change: ServiceStateChange, attempt: int) -> None:
        if attempt > len(_RESOLVE_RETRY_DELAYS_S) or self._closed:
            log.warning("mdns_resolve_gave_up", service=name)
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._retries.discard(handle)
            if not self._closed:
                self._changes.put_nowait((name, change, attempt))

        handle = loop.call_later(_RESOLVE_RETRY_DELAYS_S[attempt - 1], fire)
        self._retries.add(handle)

    async def _consume(self) -> None:
        while True:
            name, change, attempt = await self._changes.get()
            try:
                if name == self.instance_name:
                    continue
                if change is ServiceStateChange.Removed:
                    self._removed(name)
                else:
                    await self._resolve(name, attempt)
            except Exception:  # task root: one bad record must not stop discovery
                log.exception("mdns_event_failed", service=name, change=change.name)

    def _removed(self, name: str) -> None:
        info = self._known.pop(name, None)
        if info is not None:
            log.info("mdns_peer_gone", peer=info.node_id)
            self.on_event(Gone(node_id=info.node_id, address=info.address))

    async def _resolve(self, name: str, attempt: int) -> None:
        assert self._aiozc is not None
        sinfo = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await sinfo.async_request(self._aiozc.zeroconf, int(self.resolve_timeout_s * 1000)):
            log.info("mdns_resolve_failed", service=name, attempt=attempt)
            self._retry(name, ServiceStateChange.Updated, attempt + 1)
            return
        info = self._peer_info(name, sinfo)
        if info is None or info.node_id == self.node_id:
            return
        previous = self._known.get(name)
        if previous == info:
            return
        if previous is not None and previous.node_id != info.node_id:
            self._removed(name)  # a different node took over this instance name
            previous = None
        self._known[name] = info
        if previous is None:
            log.info("mdns_peer_discovered", peer=info.node_id, address=info.address, fingerprint=info.fingerprint)
            self.on_event(Discovered(info=info))
        else:
            log.info("mdns_peer_updated", peer=info.node_id, address=info.address, catalog_digest=info.catalog_digest)
            self.on_event(Updated(info=info))

    def _peer_info(self, name: str, sinfo: AsyncServiceInfo) -> PeerInfo | None:
        ip = pick_address(sinfo.parsed_addresses(), self._own_addresses)
        port = sinfo.port
        if ip is None or not port:
            log.info("mdns_peer_unreachable", service=name, addresses=sinfo.parsed_addresses(), port=port)
            return None
        return peer_info_from_txt(sinfo.decoded_properties, name, _host_port(ip, port))


def browse_once(timeout_s: float = 3.0, *, interfaces: Sequence[str] = (), limit: int = 32) -> list[str]:
    """The peer ports (``host:port``) of the quorum nodes that answer on the LAN within ``timeout_s``: what a
    machine not in any cluster yet can find (``quorum-node join CODE``). Blocking; at most ``limit``."""
    from zeroconf import ServiceBrowser, ServiceListener

    found: list[str] = []
    names: list[str] = []

    class _Listener(ServiceListener):
        def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            if len(names) < limit:
                names.append(name)

        def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            pass

        def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            pass

    zc = Zeroconf(interfaces=list(interfaces) or InterfaceChoice.All, ip_version=IPVersion.V4Only)
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, _Listener())
        time.sleep(timeout_s)
        browser.cancel()
        for name in names:
            info = zc.get_service_info(SERVICE_TYPE, name, timeout=1000)
            if info is None or not info.port:
                continue
            for ip in info.parsed_scoped_addresses():
                found.append(_host_port(ip, info.port))
    finally:
        zc.close()
    return list(dict.fromkeys(found))
