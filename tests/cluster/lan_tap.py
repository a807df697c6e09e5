"""A tap on a LAN of namespaces, for tests/cluster/test_trust_lan.py: every frame on the bridge, as a sniffer sees it.

Run in the bridge's namespace (``scripts/lan``'s ``PREFIX-br``) with ``ip netns exec``::

    python -m tests.cluster.lan_tap OUT

It opens a raw ``AF_PACKET`` socket for every protocol (tcpdump's way, without
tcpdump) on every interface of that namespace — the bridge's ports, one per
host — and appends each frame to ``OUT`` (a 4-byte big-endian length, then the
frame). It says ``@@{"ready": true}`` once capturing, and stops at a line or
EOF on stdin, saying ``@@{"captured": {"frames", "bytes"}}``.

``read_capture`` parses such a file in the test: the payload of every TCP
connection put back in order (a frame seen on two ports, or sent again, counts
once) and every UDP payload, so a search for a string finds it even where TCP
cut it across segments.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Capture", "read_capture"]

ETH_P_ALL = 0x0003
_ETH_IPV4 = 0x0800
_ETH_VLAN = 0x8100


def say(**kw: object) -> None:
    import json

    print("@@" + json.dumps(kw), flush=True)


def capture(out: Path) -> int:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:  # past rmem_max (root may): a burst must not drop frames before they are read
        sock.setsockopt(socket.SOL_SOCKET, 33, 16 * 1024 * 1024)  # SO_RCVBUFFORCE
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024 * 1024)
    frames = total = 0
    with out.open("wb") as f:
        say(ready=True)
        stdin = sys.stdin.fileno()
        while True:
            readable, _, _ = select.select([sock, stdin], [], [])
            if sock in readable:
                frame = sock.recv(256 * 1024)
                f.write(struct.pack(">I", len(frame)) + frame)
                frames += 1
                total += len(frame)
            if stdin in readable:
                os.read(stdin, 4096)  # a line or EOF: stop (frames already read are kept)
                break
    sock.close()
    say(captured={"frames": frames, "bytes": total})
    return 0


# -- in the test -------------------------------------------------------------------


Flow = tuple[str, int, str, int]  # source address, source port, destination address, destination port


@dataclass
class Capture:
    """What a tap saw: each TCP direction's payload in sequence order, and the UDP payloads."""

    tcp: dict[Flow, bytes] = field(default_factory=dict)
    udp: list[tuple[Flow, bytes]] = field(default_factory=list)
    frames: int = 0

    def find(self, needle: bytes) -> list[str]:
        """Where ``needle`` appears: one line per TCP flow or UDP datagram that carries it."""
        hits = [f"tcp {s}:{sp} -> {d}:{dp}" for (s, sp, d, dp), data in self.tcp.items() if needle in data]
        hits += [f"udp {s}:{sp} -> {d}:{dp}" for (s, sp, d, dp), data in self.udp if needle in data]
        return hits

    def tcp_bytes(self, *, to_port: int | None = None, between: tuple[str, str] | None = None) -> int:
        """Payload bytes carried by the TCP flows matching the filters (either direction for ``between``)."""
        n = 0
        for (s, sp, d, dp), data in self.tcp.items():
            if to_port is not None and to_port not in (sp, dp):
                continue
            if between is not None and {s, d} != set(between):
                continue
            n += len(data)
        return n


def _ipv4(raw: bytes) -> str:
    return socket.inet_ntoa(raw)


def read_capture(path: Path) -> Capture:
    segments: dict[Flow, dict[int, bytes]] = {}
    cap = Capture()
    data = path.read_bytes()
    i = 0
    while i + 4 <= len(data):
        (n,) = struct.unpack_from(">I", data, i)
        frame = data[i + 4 : i + 4 + n]
        i += 4 + n
        cap.frames += 1
        if len(frame) < 14:
            continue
        eth_type = struct.unpack_from(">H", frame, 12)[0]
        off = 14
        if eth_type == _ETH_VLAN and len(frame) >= 18:
            eth_type = struct.unpack_from(">H", frame, 16)[0]
            off = 18
        if eth_type != _ETH_IPV4 or len(frame) < off + 20:
            continue
        ip = frame[off:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack_from(">H", ip, 2)[0] or len(ip)
        proto = ip[9]
        src, dst = _ipv4(ip[12:16]), _ipv4(ip[16:20])
        body = ip[ihl : min(total, len(ip))]
        if proto == 6 and len(body) >= 20:
            sport, dport, seq = struct.unpack_from(">HHI", body, 0)
            payload = body[(body[12] >> 4) * 4 :]
            if payload:
                flow = (src, sport, dst, dport)
                held = segments.setdefault(flow, {})
                if len(payload) > len(held.get(seq, b"")):
                    held[seq] = payload
        elif proto == 17 and len(body) >= 8:
            sport, dport = struct.unpack_from(">HH", body, 0)
            cap.udp.append(((src, sport, dst, dport), body[8:]))
    for flow, held in segments.items():
        out = bytearray()
        end = None
        for seq in sorted(held):  # in order; what overlaps the bytes already placed is a retransmission
            payload = held[seq]
            if end is not None and seq < end:
                payload = payload[end - seq :]
            out += payload
            end = max(end or 0, seq + len(held[seq]))
        cap.tcp[flow] = bytes(out)
    return cap


if __name__ == "__main__":
    sys.exit(capture(Path(sys.argv[1])))
