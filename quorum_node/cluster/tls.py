"""Mutual TLS between the nodes of a LAN, pinned through membership (no CA).

Each node serves its peers on its **peer port** (HTTPS, TLS 1.3 only) with its
own self-signed Ed25519 certificate (``identity.py``). Both ends check the
other against the membership records (``members.py``):

- the server asks every client for a certificate and trusts exactly the
  members' certificates (``CERT_OPTIONAL``: a client with none may only ask to
  join, ``POST /quorum/v1/join``; a certificate that is not a member's fails
  the handshake). Python cannot take a certificate out of a live context, so a
  removed member's handshake may still succeed: every request is checked
  against the current membership as well (``peer_of``), and a removal closes
  the removed node's connections (``service``);
- a client connects to one member at a time with a context that trusts only
  that member's certificate (``client_for``), so an answer comes from the
  node the request was meant for, or the handshake fails. A static
  ``--peer HOST:PORT`` whose id is not known yet is first probed with a context
  that trusts every member (``any_member``).

Certificates are compared as keys: a member's id is derived from its key
(``node_id_for``), and its record holds its certificate.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from typing import Any

from .identity import NodeIdentity, cert_sign_key, node_id_for
from .members import MemberStore

__all__ = ["PeerTLS", "certless_client", "peer_cert_id"]

_CACHE_MAX = 4096
_cert_ids: dict[bytes, str] = {}


def peer_cert_id(ssl_object: Any) -> str | None:
    """The node id of the certificate the other end of a TLS connection presented (None: none, or not ours)."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return _id_of(der) if der else None


def _id_of(der: bytes) -> str | None:
    nid = _cert_ids.get(der)
    if nid is None:
        try:
            nid = node_id_for(cert_sign_key(der))
        except ValueError:
            return None
        if len(_cert_ids) >= _CACHE_MAX:
            _cert_ids.clear()
        _cert_ids[der] = nid
    return nid


def _base(purpose: int, identity: NodeIdentity | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if purpose == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False  # pinned by certificate, never by name
    ctx.verify_mode = ssl.CERT_REQUIRED
    if identity is not None:
        # load_cert_chain reads files only: the key goes through a private temp file, removed at once
        fd, path = tempfile.mkstemp(prefix=".quorum-tls-", suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(identity.key_pem() + identity.cert_pem())
            ctx.load_cert_chain(path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return ctx


def certless_client(pinned: bytes | None) -> ssl.SSLContext:
    """A client context with no certificate of its own (a machine joining, a member introducing itself):
    trusting exactly the certificate ``pinned``, or checking nothing — then the caller checks the key of the
    certificate it got (``peer_cert_id``) before it sends anything."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, None)
    if pinned is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cadata=pinned)
    return ctx


class PeerTLS:
    """The TLS contexts of one node, kept in step with its membership."""

    def __init__(self, identity: NodeIdentity, members: MemberStore) -> None:
        self.identity = identity
        self.members = members
        self.server = _base(ssl.PROTOCOL_TLS_SERVER, identity)
        self.server.verify_mode = ssl.CERT_OPTIONAL
        self.server.num_tickets = 0  # peers keep connections open and never resume: tickets would be wasted work
        self._trusted: set[bytes] = set()
        self._clients: dict[str, tuple[bytes, ssl.SSLContext]] = {}
        self._any: ssl.SSLContext | None = None
        self.refresh()

    def refresh(self) -> None:
        """Trust the certificates of members admitted since (call on every membership change)."""
        for a in self.members.members().values():
            if a.cert not in self._trusted and a.node_id != self.identity.node_id:
                self.server.load_verify_locations(cadata=a.cert)
                self._trusted.add(a.cert)
        current = {nid: a.cert for nid, a in self.members.members().items()}
        for nid in [n for n, (cert, _) in self._clients.items() if current.get(n) != cert]:
            del self._clients[nid]
        self._any = None

    def client_for(self, node_id: str) -> ssl.SSLContext | None:
        """A client context that trusts exactly the member ``node_id`` (None: it is not a member)."""
        member = self.members.get(node_id)
        if member is None or node_id == self.identity.node_id:
            return None
        held = self._clients.get(node_id)
        if held is None or held[0] != member.cert:
            ctx = _base(ssl.PROTOCOL_TLS_CLIENT, self.identity)
            ctx.load_verify_locations(cadata=member.cert)
            held = self._clients[node_id] = (member.cert, ctx)
        return held[1]

    def any_member(self) -> ssl.SSLContext | None:
        """A client context that trusts every other member (to learn who answers at a static address)."""
        if self._any is None:
            others = [a.cert for nid, a in self.members.members().items() if nid != self.identity.node_id]
            if not others:
                return None
            ctx = _base(ssl.PROTOCOL_TLS_CLIENT, self.identity)
            for cert in others:
                ctx.load_verify_locations(cadata=cert)
            self._any = ctx
        return self._any

    def peer_of(self, ssl_object: Any) -> str | None:
        """The member on the other end of a server-side TLS connection, or None (no certificate, or not a
        current member's: removed members are refused here even when their handshake succeeded)."""
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None  # once a request
        nid = _id_of(der) if der else None
        if nid is None:
            return None
        member = self.members.get(nid)
        if member is None or member.cert != der:
            return None
        return nid
