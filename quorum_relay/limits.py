"""Per-address admission limits (pure logic: callers pass ``now``).

``address_key`` groups addresses the way one party holds them: an IPv4 address
alone, an IPv6 address by its /64 (one host usually owns a whole /64, so
per-address limits keyed by the full IPv6 address would limit nothing).
``client_address`` finds the real client behind trusted reverse proxies.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

__all__ = ["AddressCounts", "TokenBuckets", "address_key", "client_address", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(specs: Sequence[str]) -> tuple[Network, ...]:
    """``ValueError`` for a spec that is neither an address nor a CIDR network."""
    return tuple(ipaddress.ip_network(s.strip(), strict=False) for s in specs if s.strip())


def address_key(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return ip


def _trusted(ip: str, networks: Sequence[Network]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in n for n in networks)


def client_address(peer_ip: str, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """The client's address: ``peer_ip``, or when that is a trusted proxy, the
    rightmost ``X-Forwarded-For`` entry that is not itself a trusted proxy
    (entries left of it are the client's say-so and cannot be believed)."""
    if not trusted or not forwarded_for or not _trusted(peer_ip, trusted):
        return peer_ip
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer_ip


class TokenBuckets:
    """One token bucket per key: ``burst`` tokens, refilled at ``rate_per_s``.

    At most ``max_keys`` buckets are kept; past that the least recently used one
    is forgotten (a forgotten bucket is a full one, which is what it would have
    refilled to anyway for any key quiet long enough to be the oldest).
    """

    __slots__ = ("_buckets", "burst", "max_keys", "rate_per_s")

    def __init__(self, rate_per_s: float, burst: float, *, max_keys: int = 65536) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, key: str, now: float) -> float:
        state = self._buckets.get(key)
        if state is None:
            return self.burst
        tokens, at = state
        return min(self.burst, tokens + (now - at) * self.rate_per_s)

    def take(self, key: str, now: float) -> bool:
        """Spend one token for ``key``; ``False`` (nothing spent) if there is none."""
        tokens = self._level(key, now)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        self._buckets.pop(key, None)  # re-insert: dict order is recency order
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]
        return ok

    def retry_after_s(self, key: str, now: float) -> float:
        """Seconds until ``key`` has a token again."""
        missing = 1.0 - self._level(key, now)
        return 0.0 if missing <= 0 or self.rate_per_s <= 0 else missing / self.rate_per_s

    def prune(self, now: float) -> int:
        """Forget buckets that have refilled; returns how many."""
        full = [k for k in self._buckets if self._level(k, now) >= self.burst]
        for k in full:
            del self._buckets[k]
        return len(full)


class AddressCounts:
    """Open connections per key, at most ``limit`` each."""

    __slots__ = ("_counts", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)

    def acquire(self, key: str) -> bool:
        n = self._counts.get(key, 0)
        if n >= self.limit:
            return False
        self._counts[key] = n + 1
        return True

    def release(self, key: str) -> None:
        n = self._counts.get(key, 0) - 1
        if n > 0:
            self._counts[key] = n
        else:
            self._counts.pop(key, None)
