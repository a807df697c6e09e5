"""Who belongs to the cluster: signed membership records, replicated like API keys.

A cluster is named by its **root**: the node id of the member that founded it
(``quorum-node cluster init``). Membership is a set of records, each signed by
a member's Ed25519 key (``identity.py``):

- ``Admission``: a node's public keys (Ed25519 ``sign_key``, X25519
  ``dh_key``), its TLS certificate and name, vouched for by the node itself
  (``self_sig``: it holds the key), and admitted by a member (``by``, ``sig``).
  The founder's own admission is the only one signed by the node it admits.
- ``Removal``: a member is out, for good (*removal wins*: no admission of that
  node id counts again; a removed machine can only come back as a new node, with
  a new key, through a new invite). ``keep`` lists the members the removed node
  had admitted that stay (the remover's view when it removed it).

Which nodes are members is a function of the records (``MemberStore._compute``):
starting from the root, a node is known when a known node admitted it (an
admission by a removed node counts only where its removal keeps it); members
are the known nodes that no removal names.

Records are accepted one by one (``merge``), in the order a peer sends them (its
own acceptance order), and only from signers that are members at the time: so
once a node has heard that a member is removed, nothing that member signs
afterwards (admissions, removals, API key records) is accepted there — except
the admissions its removal ``keep``s, which every node must hold whichever it
heard of first. An admission of a node that is removed is still held (a node
that heard of the removal first needs it to check what that node signed while
a member, and what it admitted that is kept), but never makes it a member
again. Anything that does not verify is refused and counted; nothing is learnt
from it.

Pure logic: no asyncio, no I/O except ``load``/``dump`` of bytes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from typing import Annotated

import msgspec

from .identity import MAX_CERT_BYTES, NodeIdentity, cert_sign_key, node_id_for, verify_signature

__all__ = [
    "MAX_RECORDS",
    "Admission",
    "Candidate",
    "MemberStore",
    "Record",
    "Removal",
    "check_name",
    "decode_records",
    "encode_records",
]

MAX_RECORDS = 4096
NAME_RE = re.compile(r"[^\x00-\x1f\x7f]{1,64}")

_NodeId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{24}$")]
_Key = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
_Sig = Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]
_When = Annotated[float, msgspec.Meta(ge=0, le=1e11)]
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")]


def check_name(name: str) -> str:
    """A node name as membership keeps it: 1-64 printable characters, no control characters."""
    name = name.strip()
    if not NAME_RE.fullmatch(name):
        raise ValueError("a node name is 1-64 printable characters")
    return name


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    """What a node says of itself when it asks to join: its keys, certificate and name, signed by itself."""

    node_id: _NodeId
    sign_key: _Key
    dh_key: _Key
    cert: Annotated[bytes, msgspec.Meta(max_length=MAX_CERT_BYTES)]
    name: _Name
    self_sig: _Sig = b""

    def signed_bytes(self) -> bytes:
        return b"quorum/v1/member-self\x00" + _pack((self.node_id, self.sign_key, self.dh_key, self.cert, self.name))

    def check(self) -> None:
        """ValueError unless the candidate is self-consistent: id of its key, certificate of its key, signed."""
        if node_id_for(self.sign_key) != self.node_id:
            raise ValueError("node id does not match its key")
        if cert_sign_key(self.cert) != self.sign_key:
            raise ValueError("certificate is not for its key")
        if not verify_signature(self.sign_key, self.signed_bytes(), self.self_sig):
            raise ValueError("not signed by its own key")

    @classmethod
    def of(cls, identity: NodeIdentity, name: str) -> Candidate:
        c = cls(
            node_id=identity.node_id,
            sign_key=identity.sign_key,
            dh_key=identity.dh_key,
            cert=identity.cert_der,
            name=check_name(name),
        )
        return msgspec.structs.replace(c, self_sig=identity.sign(c.signed_bytes()))


class Admission(msgspec.Struct, frozen=True, kw_only=True, tag="admit", tag_field="kind"):
    node_id: _NodeId
    sign_key: _Key
    dh_key: _Key
    cert: Annotated[bytes, msgspec.Meta(max_length=MAX_CERT_BYTES)]
    name: _Name
    self_sig: _Sig
    by: _NodeId
    at: _When
    sig: _Sig = b""

    def candidate(self) -> Candidate:
        return Candidate(
            node_id=self.node_id,
            sign_key=self.sign_key,
            dh_key=self.dh_key,
            cert=self.cert,
            name=self.name,
            self_sig=self.self_sig,
        )

    def signed_bytes(self) -> bytes:
        return b"quorum/v1/member-admit\x00" + _pack(
            (self.node_id, self.sign_key, self.dh_key, self.cert, self.name, self.self_sig, self.by, self.at)
        )


class Removal(msgspec.Struct, frozen=True, kw_only=True, tag="remove", tag_field="kind"):
    node_id: _NodeId
    by: _NodeId
    at: _When
    keep: Annotated[list[_NodeId], msgspec.Meta(max_length=MAX_RECORDS)] = []
    sig: _Sig = b""

    def signed_bytes(self) -> bytes:
        return b"quorum/v1/member-remove\x00" + _pack((self.node_id, self.by, self.at, sorted(self.keep)))


Record = Admission | Removal

_pack = msgspec.msgpack.Encoder().encode
_records_decoder: msgspec.json.Decoder[list[Record]] = msgspec.json.Decoder(
    Annotated[list[Record], msgspec.Meta(max_length=MAX_RECORDS)]
)
_encode = msgspec.json.Encoder().encode


def decode_records(raw: bytes) -> list[Record]:
    """A JSON list of records (ValueError — msgspec's — if it is not one)."""
    return _records_decoder.decode(raw)


def encode_records(records: list[Record]) -> bytes:
    return _encode(records)


class MemberStore:
    """The membership records this node holds, and who is a member by them.

    ``root`` is the cluster's founder (its id names the cluster). ``on_change``
    callbacks run after a change (a member came, went, or changed).
    """

    def __init__(self, root: str, records: Iterable[Record] = ()) -> None:
        self.root = root
        self._records: list[Record] = []
        self._seen: set[bytes] = set()
        self._members: dict[str, Admission] = {}
        self._known: dict[str, Admission] = {}
        self._removed: dict[str, list[Removal]] = {}
        self._admitters: set[str] = set()  # who signed an admission held (of another node)
        self.digest = ""
        self.on_change: list[Callable[[], None]] = []
        self.merge(records)

    # -- what the cluster asks ---------------------------------------------------------

    def members(self) -> dict[str, Admission]:
        """Current members by node id (their admission: keys, certificate, name)."""
        return dict(self._members)

    def get(self, node_id: str) -> Admission | None:
        """The member ``node_id``'s admission, or None if it is not a member (never was, or removed)."""
        return self._members.get(node_id)

    def is_member(self, node_id: str) -> bool:
        return node_id in self._members

    def was_removed(self, node_id: str) -> bool:
        return node_id in self._removed

    def removed_ids(self) -> list[str]:
        return sorted(self._removed)

    def known(self, node_id: str) -> Admission | None:
        """A node admitted at some time (maybe removed since): for records it signed while a member."""
        return self._known.get(node_id)

    def records(self) -> list[Record]:
        """Every record held, in the order accepted (the order a peer must apply them in)."""
        return list(self._records)

    def __len__(self) -> int:
        return len(self._members)

    # -- changes ------------------------------------------------------------------------

    def merge(self, incoming: Iterable[Record], *, max_new: int | None = None) -> tuple[int, int]:
        """Accept the records that verify, in order; return ``(accepted, refused)``.

        A record whose signer is not (yet) a member is retried after the others
        of the same batch (a peer may send an admission after a record its
        subject signed); what still fails is refused. ``max_new``: a batch with
        more records this store does not hold yet is refused whole, unread (for
        senders nobody authenticated: checking a record costs signatures).
        """
        pending = [r for r in incoming if r.sig not in self._seen]
        if max_new is not None and len(pending) > max_new:
            return 0, len(pending)
        accepted = 0
        while pending:
            left = []
            for r in pending:
                if r.sig in self._seen:
                    continue
                if self._accept(r):
                    accepted += 1
                else:
                    left.append(r)
            if len(left) == len(pending):
                break
            pending = left
        refused = sum(1 for r in pending if r.sig not in self._seen)
        if accepted:
            self._compute()
            self.digest = hashlib.sha256(b"".join(sorted(r.sig for r in self._records))).hexdigest()[:32]
            for cb in list(self.on_change):
                cb()
        return accepted, refused

    def _accept(self, r: Record) -> bool:
        if len(self._records) >= MAX_RECORDS:
            return False
        if isinstance(r, Admission):
            if not self._admission_verifies(r):
                return False
        else:
            signer = self._members.get(r.by)
            if signer is None or not verify_signature(signer.sign_key, r.signed_bytes(), r.sig):
                return False
        self._records.append(r)
        self._seen.add(r.sig)
        self._update(r)  # the next record of the batch may be signed by this one's subject
        return True

    def _admission_verifies(self, r: Admission) -> bool:
        try:
            r.candidate().check()
        except ValueError:
            return False
        if r.by == r.node_id:  # self-admitted: only the founder
            signer_key = r.sign_key if r.node_id == self.root else None
        else:
            signer = self._members.get(r.by)
            if signer is None and r.by in self._removed and any(r.node_id in rm.keep for rm in self._removed[r.by]):
                signer = self._known.get(r.by)  # removed since, but its removal keeps this one
            signer_key = signer.sign_key if signer is not None else None
        return signer_key is not None and verify_signature(signer_key, r.signed_bytes(), r.sig)

    def _update(self, r: Record) -> None:
        """Who is known, removed and a member, after accepting ``r``: what ``_compute`` would say, without
        going over every record again where ``r`` cannot change more than its own subject (a batch of
        thousands of records would otherwise cost seconds of the event loop)."""
        if isinstance(r, Removal):
            if r.node_id in self._known:
                self._compute()  # the subject goes, and those it admitted that are not kept
            else:
                self._removed.setdefault(r.node_id, []).append(r)
            return
        if r.by != r.node_id:
            self._admitters.add(r.by)
        if r.node_id in self._known:
            return  # known already by an earlier admission, which stays the one that counts
        if r.node_id in self._admitters:
            self._compute()  # it admitted others before (then dropped out): those may count again
            return
        self._known[r.node_id] = r  # its signer is known and allowed, or it is the root's own admission
        if r.node_id not in self._removed:
            self._members[r.node_id] = r

    def _compute(self) -> None:
        removals: dict[str, list[Removal]] = {}
        for r in self._records:
            if isinstance(r, Removal):
                removals.setdefault(r.node_id, []).append(r)
        keep = {nid: {k for rm in rms for k in rm.keep} for nid, rms in removals.items()}
        by_subject: dict[str, list[Admission]] = {}
        for r in self._records:
            if isinstance(r, Admission):
                by_subject.setdefault(r.node_id, []).append(r)
        known: dict[str, Admission] = {}
        for a in by_subject.get(self.root, ()):
            if a.by == self.root:
                known[self.root] = a
                break
        changed = True
        while changed:
            changed = False
            for nid, adms in by_subject.items():
                if nid in known:
                    continue
                for a in adms:
                    if a.by in known and (a.by not in removals or nid in keep[a.by]):
                        known[nid] = a
                        changed = True
                        break
        self._known = known
        self._removed = removals
        self._members = {nid: a for nid, a in known.items() if nid not in removals}
        self._admitters = {a.by for adms in by_subject.values() for a in adms if a.by != a.node_id}

    # -- records this node signs ----------------------------------------------------------

    def found(self, identity: NodeIdentity, name: str, now: float) -> Admission:
        """The founder's own admission (only for the node whose id is ``root``)."""
        if identity.node_id != self.root:
            raise ValueError("only the root founds the cluster")
        return self._admit(identity, Candidate.of(identity, name), now)

    def admit(self, identity: NodeIdentity, candidate: Candidate, now: float) -> Admission:
        """Admit ``candidate`` (checked) on behalf of this node, which must be a member."""
        candidate.check()
        if candidate.node_id in self._removed:
            raise ValueError("that node was removed from the cluster; it can only join again as a new node")
        if identity.node_id not in self._members:
            raise ValueError("this node is not a member, so it cannot admit anyone")
        return self._admit(identity, candidate, now)

    def _admit(self, identity: NodeIdentity, candidate: Candidate, now: float) -> Admission:
        a = Admission(
            node_id=candidate.node_id,
            sign_key=candidate.sign_key,
            dh_key=candidate.dh_key,
            cert=candidate.cert,
            name=candidate.name,
            self_sig=candidate.self_sig,
            by=identity.node_id,
            at=round(now, 3),
        )
        a = msgspec.structs.replace(a, sig=identity.sign(a.signed_bytes()))
        accepted, _ = self.merge([a])
        if not accepted and a.sig not in self._seen:
            raise ValueError("the admission was refused")
        return a

    def remove(self, identity: NodeIdentity, node_id: str, now: float) -> Removal:
        """Remove ``node_id`` for good, on behalf of this node (a member); keeps those it admitted."""
        if identity.node_id not in self._members:
            raise ValueError("this node is not a member, so it cannot remove anyone")
        if node_id not in self._known:
            raise ValueError(f"{node_id} is not a member")
        kept = sorted(nid for nid, a in self._members.items() if a.by == node_id and nid != node_id)
        rm = Removal(node_id=node_id, by=identity.node_id, at=round(now, 3), keep=kept)
        rm = msgspec.structs.replace(rm, sig=identity.sign(rm.signed_bytes()))
        self.merge([rm])
        return rm

    def rows(self, self_id: str) -> list[dict[str, object]]:
        """The members for people (the CLI's ``cluster members``), by name; ``self_id``'s row marked."""
        return [
            {"node_id": nid, "name": a.name, "by": a.by, "at": a.at, "self": nid == self_id}
            for nid, a in sorted(self.members().items(), key=lambda kv: (kv[1].name, kv[0]))
        ]

    def find(self, name_or_id: str) -> str:
        """The node id of a member named ``name_or_id`` (or with that id, or id prefix); ValueError if none
        or several."""
        if name_or_id in self._known:
            return name_or_id
        hits = {nid for nid, a in self._members.items() if a.name == name_or_id}
        if not hits and len(name_or_id) >= 6:
            hits = {nid for nid in self._members if nid.startswith(name_or_id)}
        if len(hits) != 1:
            raise ValueError(
                f"no member is named {name_or_id!r}"
                if not hits
                else f"{len(hits)} members are named {name_or_id!r}: give the node id"
            )
        return hits.pop()
