"""Who is online, per namespace (pure logic).

A member is anything with a ``node_id`` and a ``since`` (wall-clock seconds);
the relay's members are its connections. Each namespace's members live in one
dict that the hot path reads directly (``members(namespace)`` returns the
live dict, not a copy), so routing a frame is one dict lookup.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

__all__ = ["Member", "Roster"]


class Member(Protocol):
    @property
    def node_id(self) -> str: ...
    @property
    def since(self) -> float: ...


M = TypeVar("M", bound=Member)


class Roster(Generic[M]):
    """Namespace → node id → member. Namespaces never see each other."""

    __slots__ = ("_spaces",)

    def __init__(self) -> None:
        self._spaces: dict[str, dict[str, M]] = {}

    def __len__(self) -> int:
        """The number of namespaces with someone online."""
        return len(self._spaces)

    def online(self) -> int:
        return sum(len(m) for m in self._spaces.values())

    def get(self, namespace: str, node_id: str) -> M | None:
        members = self._spaces.get(namespace)
        return None if members is None else members.get(node_id)

    def peers(self, namespace: str, node_id: str) -> list[M]:
        """The others online in ``namespace``, oldest first."""
        members = self._spaces.get(namespace)
        if not members:
            return []
        return [m for nid, m in members.items() if nid != node_id]

    def join(self, namespace: str, member: M) -> tuple[dict[str, M], M | None]:
        """Register ``member``; returns the namespace's live dict and the member it replaced, if any.

        The replaced member is no longer registered; telling the others it left
        is the caller's part.
        """
        members = self._spaces.setdefault(namespace, {})
        old = members.pop(member.node_id, None)
        members[member.node_id] = member
        return members, old

    def leave(self, namespace: str, member: M) -> bool:
        """Unregister ``member`` if it is the one registered under its id (not one that replaced it)."""
        members = self._spaces.get(namespace)
        if members is None or members.get(member.node_id) is not member:
            return False
        del members[member.node_id]
        if not members:
            del self._spaces[namespace]
        return True

    def namespaces(self) -> list[str]:
        return list(self._spaces)

    def all_members(self) -> list[M]:
        return [m for members in self._spaces.values() for m in members.values()]
