"""The relay's stream table (pure logic).

A stream is named by its namespace, its pair of nodes and its id; the node
whose id sorts lower opens odd ids, the other even ids, so the two ends never
pick the same id. A stream is open from its ``Open`` until both sides sent
``Close`` or either side sent ``Reset``. An open stream counts against the
stream limit of both its nodes (each end holds it; a node is as busy serving
streams as opening them).
"""

from __future__ import annotations

import enum

__all__ = ["OpenResult", "StreamTable"]

Key = tuple[str, str, str, int]  # (namespace, lower id, higher id, stream)
NodeKey = tuple[str, str]  # (namespace, node id)


class OpenResult(enum.Enum):
    OPENED = "opened"
    TOO_MANY = "too_many_streams"  # answered with Reset; the connection lives on
    BAD_ID = "bad_stream_id"  # stream id < 1, or of the other side's parity
    DUPLICATE = "duplicate_stream"  # that id is open already


def _key(namespace: str, a: str, b: str, stream: int) -> tuple[Key, int]:
    """The stream's key, and the close bit of ``a`` (1: the lower id, 2: the higher)."""
    if a < b:
        return (namespace, a, b, stream), 1
    return (namespace, b, a, stream), 2


class StreamTable:
    __slots__ = ("_by_node", "_open", "max_per_node")

    def __init__(self, max_per_node: int) -> None:
        self.max_per_node = max_per_node
        self._open: dict[Key, int] = {}  # key → close bits seen (1 | 2)
        self._by_node: dict[NodeKey, set[Key]] = {}

    def __len__(self) -> int:
        return len(self._open)

    def count(self, namespace: str, node_id: str) -> int:
        keys = self._by_node.get((namespace, node_id))
        return 0 if keys is None else len(keys)

    def is_open(self, namespace: str, src: str, dst: str, stream: int) -> bool:
        return ((namespace, src, dst, stream) if src < dst else (namespace, dst, src, stream)) in self._open

    def open(self, namespace: str, src: str, dst: str, stream: int) -> OpenResult:
        """``src`` opens ``stream`` towards ``dst``."""
        if stream < 1 or (stream & 1) != (1 if src < dst else 0):
            return OpenResult.BAD_ID
        key, _ = _key(namespace, src, dst, stream)
        if key in self._open:
            return OpenResult.DUPLICATE
        a = self._by_node.setdefault((namespace, src), set())
        b = self._by_node.setdefault((namespace, dst), set())
        if len(a) >= self.max_per_node or len(b) >= self.max_per_node:
            self._forget_if_empty((namespace, src), a)
            self._forget_if_empty((namespace, dst), b)
            return OpenResult.TOO_MANY
        self._open[key] = 0
        a.add(key)
        b.add(key)
        return OpenResult.OPENED

    def close(self, namespace: str, src: str, dst: str, stream: int) -> bool:
        """``src`` finished its half; ``False`` if the stream is not open (the frame is dropped)."""
        key, bit = _key(namespace, src, dst, stream)
        seen = self._open.get(key)
        if seen is None:
            return False
        seen |= bit
        if seen == 3:
            self._remove(key)
        else:
            self._open[key] = seen
        return True

    def reset(self, namespace: str, src: str, dst: str, stream: int) -> bool:
        """Either side aborted the stream; ``False`` if it is not open (the frame is dropped)."""
        key, _ = _key(namespace, src, dst, stream)
        if key not in self._open:
            return False
        self._remove(key)
        return True

    def drop_node(self, namespace: str, node_id: str) -> list[tuple[str, int]]:
        """Forget every stream of a node that went away; ``(other node, stream)`` for each, to reset."""
        keys = self._by_node.pop((namespace, node_id), None)
        if not keys:
            return []
        out: list[tuple[str, int]] = []
        for key in keys:
            del self._open[key]
            _, lo, hi, stream = key
            other = hi if lo == node_id else lo
            nk = (namespace, other)
            peer_keys = self._by_node.get(nk)
            if peer_keys is not None:
                peer_keys.discard(key)
                self._forget_if_empty(nk, peer_keys)
            out.append((other, stream))
        out.sort()
        return out

    def _remove(self, key: Key) -> None:
        del self._open[key]
        namespace, lo, hi, _ = key
        for node in (lo, hi):
            nk = (namespace, node)
            keys = self._by_node.get(nk)
            if keys is not None:
                keys.discard(key)
                self._forget_if_empty(nk, keys)

    def _forget_if_empty(self, nk: NodeKey, keys: set[Key]) -> None:
        if not keys:
            self._by_node.pop(nk, None)
