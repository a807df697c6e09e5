"""The cluster's models as every list and lookup reads them: one merged view, rebuilt only when it changes.

``ModelCard`` is the one shape of a model as one holder has it: what a node's
engines hold (``local_cards``), what a peer's catalog message carries
(``cluster/messages.py`` decodes a list of them), and each entry of the view.
``entries_of`` is the one place that merges this node's engines and its
serving peers' catalogs into the cluster's models; ``/v1/models``, the Ollama
tags, the dashboard and ``quorum-node models`` all read the view it makes.

A ``CatalogView`` is every (model, holder) entry of this node's engines and of
its serving peers, grouped by model id, with an index of every name (ids and
aliases). ``Catalog`` keeps the current view and builds a new one only after
the catalog changed: ``changed()`` is the hook (the registry's ``on_change``
calls it; so may the cluster when a peer's catalog or state changes), and a
cheap stamp of what the view was built from (``stamp``: the peers' catalogs
and states, compared by identity) is checked on each read as a backstop.

Surfaces keep what they make of a view in it (``memo``): the encoded
``/v1/models``, ``/api/tags`` and ``/api/ps`` are made once per change and
then served as they are, whatever the number of requests or models.

A key scoped to some models sees a view of only those (``Catalog.scoped``, one
per scope set): lists, lookups and the close matches of a 404 alike.

A 404 names a few close matches (``model_not_found``), never the whole
catalog; in a large catalog they are looked for among the names that sort
near the one asked for (and near its last path segment), so a 404 costs the
same with 40 models or 40,000.

Pure logic: no I/O, nothing awaits.
"""

from __future__ import annotations

import bisect
import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any, Protocol, TypeVar

import msgspec

from .errors import NotFound
from .lineage import Lineage, name_key
from .names import MODEL_ID_PATTERN

__all__ = ["Catalog", "CatalogView", "ModelCard", "cluster_stamp", "entries_of", "local_cards", "model_not_found"]

T = TypeVar("T")

_ModelId = Annotated[str, msgspec.Meta(pattern=MODEL_ID_PATTERN)]
_Label = Annotated[str, msgspec.Meta(max_length=256, pattern=r"\A[^\x00-\x1f\x7f]*\Z")]  # printable, bounded


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    """One model as one holder has it. Decoded from a peer, every field is checked (``names.py``)."""

    id: _ModelId
    aliases: Annotated[tuple[_ModelId, ...], msgspec.Meta(max_length=64)] = ()
    engine: _Label = ""  # the kind of engine that holds it (llamacpp, ollama, …)
    holder: _Label = ""  # the name of the engine that holds it, on its node (a conversation's holder: affinity.py)
    node: _Label = ""  # the node whose engine holds it (set by the receiver: a peer's word is not needed)
    context_length: int | None = None
    loaded: bool | None = None
    owned_by: _Label = "quorum"
    created: int = 0
    family: _Label | None = None
    parameter_size: _Label | None = None
    quantization: _Label | None = None
    available: bool = True  # False: its engine is down for now (a request for it is 503, not 404)
    lineage: Lineage | None = None  # which model it is, whatever its engine calls it (``lineage.py``)
    # a sharded holder (cluster/sharding.py): the nodes whose memory holds its layers; () for any other
    helpers: Annotated[tuple[_Label, ...], msgspec.Meta(max_length=16)] = ()

    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)


class _Model(Protocol):
    """A model as an engine adapter describes it (``backends.base.Model``)."""

    @property
    def id(self) -> str: ...
    @property
    def aliases(self) -> tuple[str, ...]: ...
    @property
    def context_length(self) -> int | None: ...
    @property
    def loaded(self) -> bool | None: ...
    @property
    def owned_by(self) -> str: ...
    @property
    def created(self) -> int: ...
    @property
    def family(self) -> str | None: ...
    @property
    def parameter_size(self) -> str | None: ...
    @property
    def quantization(self) -> str | None: ...
    @property
    def lineage(self) -> Lineage | None: ...


class _Engine(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def models(self) -> Sequence[_Model]: ...
    @property
    def helpers(self) -> tuple[str, ...]: ...


class Engines(Protocol):
    """This node's engines (``backends.registry.Registry``): those serving, and those down for now with the
    models they last held."""

    def models(self) -> Sequence[tuple[_Engine, _Model]]: ...

    def resting(self) -> Sequence[tuple[_Engine, _Model]]: ...


class PeerCatalogs(Protocol):
    """The peers' side (``cluster.service.ClusterService``): the cards of each serving peer."""

    def model_entries(self) -> list[ModelCard]: ...


def card_of(engine: _Engine, m: _Model, node: str, *, available: bool = True) -> ModelCard:
    return ModelCard(
        id=m.id,
        aliases=tuple(m.aliases),
        engine=engine.kind,
        holder=engine.name,
        node=node,
        context_length=m.context_length,
        loaded=m.loaded,
        owned_by=m.owned_by,
        created=m.created,
        family=m.family,
        parameter_size=m.parameter_size,
        quantization=m.quantization,
        available=available,
        lineage=msgspec.structs.replace(m.lineage, why=()) if m.lineage is not None else None,
        helpers=engine.helpers,
    )


def local_cards(engines: Engines, node: str, *, resting: bool = False) -> list[ModelCard]:
    """What this node's engines hold. ``resting``: also the models of an engine that is down for now,
    as unavailable (a peer then answers 503 for them rather than "no such model")."""
    out = [card_of(b, m, node) for b, m in engines.models()]
    if resting:
        held = {c.id for c in out}
        out += [card_of(b, m, node, available=False) for b, m in engines.resting() if m.id not in held]
    return out


#: At most this many models: a 404 lists them all (else it names close matches only).
LISTED_IN_FULL = 5
#: Up to this many models, close matches are looked for among all of them; past it, among neighbours.
_MATCH_ALL = 512
_NEIGHBOURS = 64  # on each side of where the name sorts, in each of the two orders
_MATCH_NAME_MAX = 256  # a longer name is compared by its first this many characters
_SCOPES_MAX = 64  # scoped views kept at once (one per scope set in use)


def _tail(name: str) -> str:
    return name.rsplit("/", 1)[-1].lower()


class CatalogView:
    """The catalog at one moment: entries by model id (sorted), names, and what surfaces made of it.

    Cards whose lineage (``lineage.py``) is the same model (family, size, variant, revision) are one
    entry, whatever their engines call them and in whatever quantization: its id is the holders' id
    where they agree, else the model's own name (``llama3.2:3b-instruct``), and every name a user
    knows selects it: each holder's id and aliases, and the lineage's names (``llama3.2``,
    ``llama3.2:3b``, ``Llama-3.2-3B-Instruct``, the GGUF stem), compared case-blind. A lineage name
    two entries could claim selects neither: a wrong model is worse than a 404.
    """

    __slots__ = ("entries", "by_id", "ids", "aliases", "_names", "_lineage_names", "_memo", "_orders")

    def __init__(self, entries: list[ModelCard], aliases: Mapping[str, str] | None = None) -> None:
        by_id: dict[str, list[ModelCard]] = {}
        grouped: dict[tuple[str, str, str | None, str | None], list[ModelCard]] = {}
        for e in entries:
            if e.lineage is not None:
                grouped.setdefault(e.lineage.entry_key(), []).append(e)
            else:
                by_id.setdefault(e.id, []).append(e)
        claims: dict[str, set[str]] = {}
        for cards in grouped.values():
            ids = {c.id for c in cards}
            lineage = cards[0].lineage
            assert lineage is not None
            mid = next(iter(ids)) if len(ids) == 1 else lineage.entry_name()
            by_id.setdefault(mid, []).extend(cards)
            for c in cards:
                assert c.lineage is not None
                for name in (*c.lineage.names(), *c.lineage.weights_names()):
                    claims.setdefault(name, set()).add(mid)
        self.entries = entries
        self.by_id: dict[str, list[ModelCard]] = {mid: by_id[mid] for mid in sorted(by_id)}
        self.ids: tuple[str, ...] = tuple(self.by_id)
        names: dict[str, str] = {}
        for mid, es in self.by_id.items():
            for e in es:
                for a in (e.id, *e.aliases):
                    names.setdefault(a, mid)
        names.update((mid, mid) for mid in self.ids)  # an id wins over another model's alias
        self._names = names
        self._lineage_names = {name: next(iter(mids)) for name, mids in claims.items() if len(mids) == 1}
        self.aliases = dict(aliases or {})
        for alias, target in self.aliases.items():  # the user's own names (settings: model_aliases)
            found = self.find(target)
            if found is not None and alias not in self.by_id:
                names[alias] = found
        self._memo: dict[str, Any] = {}
        self._orders: tuple[list[tuple[str, str]], list[tuple[str, str]]] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def find(self, name: str) -> str | None:
        """The id of the model ``name`` is (its id, one of its holders' ids or aliases, or a name its
        lineage gives it), or None."""
        found = self._names.get(name)
        if found is None and self._lineage_names:
            found = self._lineage_names.get(name_key(name))
        return found

    def holder_ids(self, name: str) -> tuple[str, ...]:
        """The ids ``name``'s holders know it by (``name`` itself first): what the router looks holders up by."""
        mid = self.find(name)
        if mid is None:
            return (name,)
        return (name, *sorted({c.id for c in self.by_id[mid]} - {name}))

    def memo(self, key: str, build: Callable[[CatalogView], T]) -> T:
        """What ``build`` makes of this view, made once (the surfaces' encodings: one per change)."""
        try:
            return self._memo[key]  # type: ignore[no-any-return]
        except KeyError:
            value = self._memo[key] = build(self)
            return value

    def filtered(self, allows: Callable[[str], bool]) -> CatalogView:
        """The models ``allows`` lets a key see: by id, or by one of their aliases."""
        keep = {mid for mid, es in self.by_id.items() if allows(mid) or any(allows(a) for e in es for a in e.aliases)}
        return CatalogView([e for e in self.entries if e.id in keep], self.aliases)

    def close_matches(self, name: str, n: int = 5) -> list[str]:
        """Up to ``n`` model ids that look like ``name`` (``difflib``), best first."""
        name = name[:_MATCH_NAME_MAX]
        candidates: Iterable[str] = self.ids if len(self.ids) <= _MATCH_ALL else self._neighbours(name)
        return difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)

    def _neighbours(self, name: str) -> list[str]:
        if self._orders is None:  # made at the first 404 after a change
            self._orders = (sorted((i.lower(), i) for i in self.ids), sorted((_tail(i), i) for i in self.ids))
        out: dict[str, None] = {}
        for order, key in zip(self._orders, (name.lower(), _tail(name)), strict=True):
            at = bisect.bisect_left(order, (key,))
            for _, mid in order[max(0, at - _NEIGHBOURS) : at + _NEIGHBOURS]:
                out[mid] = None
        return list(out)


def model_not_found(name: str, view: CatalogView) -> NotFound:
    """The 404 for a model no holder has: the models, where there are a few, else a few close matches."""
    shown = name if len(name) <= _MATCH_NAME_MAX else name[:_MATCH_NAME_MAX] + "…"
    message = f"The model `{shown}` does not exist"
    if len(view) <= LISTED_IN_FULL:
        message += f". Available models: {', '.join(view.ids) or 'none'}"
    else:
        near = view.close_matches(name)
        message += (f". Close matches: {', '.join(near)}" if near else "") + f" ({len(view)} models in all)"
    return NotFound(message, param="model", code="model_not_found")


class Catalog:
    """The current ``CatalogView``, built from ``source`` when it is first read after a change."""

    def __init__(
        self,
        source: Callable[[], list[ModelCard]],
        stamp: Callable[[], object] | None = None,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self._source = source
        self._aliases = dict(aliases or {})
        self._stamp = stamp
        self._stamped: object = None
        self._view: CatalogView | None = None
        self._scoped: dict[tuple[str, ...], CatalogView] = {}
        self.builds = 0  # views built so far (one per change that someone read)

    def changed(self) -> None:
        """The catalog changed (an engine's or a peer's models, a peer up or down): the next read rebuilds."""
        self._view = None
        self._scoped.clear()

    def view(self) -> CatalogView:
        if self._stamp is not None:
            stamp = self._stamp()
            if stamp != self._stamped:  # compared by identity first: cheap while nothing changed
                self._stamped = stamp
                self.changed()
        view = self._view
        if view is None:
            view = self._view = CatalogView(self._source(), self._aliases)
            self.builds += 1
        return view

    def scoped(self, scope: tuple[str, ...], allows: Callable[[str], bool]) -> CatalogView:
        """The view of a key scoped to ``scope`` (its model globs; ``allows`` matches them)."""
        view = self.view()
        got = self._scoped.get(scope)
        if got is None:
            if len(self._scoped) >= _SCOPES_MAX:
                self._scoped.clear()
            got = self._scoped[scope] = view.filtered(allows)
        return got


def entries_of(engines: Engines, node: str, cluster: PeerCatalogs | None) -> list[ModelCard]:
    """Every (model, holder) pair in the cluster: this node's engines, then its serving peers'."""
    out = local_cards(engines, node)
    if cluster is not None:
        out.extend(cluster.model_entries())
    return out


def cluster_stamp(cluster: Any | None) -> object:
    """What the peers' part of the catalog was built from: each peer's state, name and catalog (the list
    object, replaced whenever a new catalog arrives), compared by identity. O(peers), no O(models)."""
    if cluster is None:
        return None
    catalogs = cluster.catalogs
    return tuple((p.node_id, p.serving, p.info.name, catalogs.get(p.node_id)) for p in cluster.table.all())
