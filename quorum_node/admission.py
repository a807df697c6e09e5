"""The admission queue: when every holder of a model is busy, a request waits its turn.

Each holder of a model runs at most its concurrency of requests at once. A
request that finds every holder of its *entry* (the model it asked for) at
capacity waits in that entry's queue, until a slot frees or its deadline
passes; it is never sent to a holder that has no room.

- **Fair across keys.** Within an entry the waiters are grouped by API key (a
  request with no key is the key ``""``) and the keys take turns, round-robin,
  first-in-first-out within a key. A key that sends ten times more requests
  gets the same turns as the others while they wait; it gets the rest only
  when they do not.
- **Bounded.** At most ``max_waiting`` requests wait, all entries together.
  An arrival that finds the queue full gets ``QueueFull`` (429), except when
  its key waits for fewer places than the key that waits for most: then that
  key's newest waiter gets ``QueueFull`` instead and the arrival takes its place
  (drop from the longest queue), so a flood from one key cannot fill the queue
  and lock the other keys out. ``max_waiting=0`` queues nothing: busy is 429 at once.
- **Deadlines.** A request waits at most ``timeout_s``; then ``QueueTimeout`` (429).
- **Cancellation.** A waiter whose task is cancelled (the client went away)
  leaves the queue at once. One that had been handed a slot passes it on to
  the next waiter: no slot is lost, none is handed out twice.
- **No overtaking.** An arrival is let through at once only if nobody waits
  for its entry and there is room; otherwise it queues behind the waiters.

How the router uses it
======================

``room`` is the router's closure for one entry: how many more requests the
entry's holders could start now (per holder ``max(0, concurrency - in_flight)``,
summed over the holders the request may go to). It is called again every time
the queue considers a waiter; its answer may change whenever it likes (a peer's
capacity arrives with its health answer).

A request that is let through (at once or after waiting) holds a *reservation*:
a slot promised to it but not yet counted in a holder's ``in_flight``. The
queue subtracts the entry's reservations from ``room()``, so a slot is never
promised twice between the moment a waiter is woken and the moment it runs.
The ``Ticket`` that ``admit`` returns ends the reservation:

- ``ticket.claim()`` as soon as the request counts in a holder's ``in_flight``
  (right after ``Target.begin()`` said yes): the slot is the holder's now;
- ``ticket.release()`` if it gives up before (no holder would take it, an
  error): the slot goes to the next waiter;
- ``with ticket:`` releases on the way out whatever was not claimed.

And ``wake(entry)`` whenever a slot of a holder of ``entry`` may have freed: a
request ended for good (not between two attempts of one request: a retry
keeps its slot), a holder came up, a peer reported more capacity. A missing
``wake`` costs latency, never a stranded request: while an entry has waiters,
the queue looks at ``room`` again every ``recheck_s`` (0.5 s) on its own::

    admission = Admission(max_waiting=settings.queue_max, timeout_s=settings.queue_timeout_s)

    with await admission.admit(model, key_id or "", room) as ticket:  # QueueFull, QueueTimeout
        ...  # target.begin() succeeded:
        ticket.claim()
    record.queue_wait_s = ticket.waited_s
    ...
    target.end(...)
    admission.wake(model)

What can be read
================

``depth()`` and ``depth(entry)``: requests waiting now; ``waiting_by_key(entry)``;
``ticket.waited_s`` for the request's record (``QueueTimeout.waited_s`` and
``QueueFull.waited_s`` for the refused); ``stats()``: counters since start,
for ``/metrics`` and the dashboard.

The ``Retry-After`` of both 429s is ``retry_after_s()``: the recent mean wait
(an exponentially weighted mean over requests let through, at once counting
as 0 and a timed-out wait as ``timeout_s``), rounded up, at least 1 and at most
``ceil(timeout_s)``. A client that comes back after that long finds the
queue about where a request that queued now would have found its turn.

Everything runs on the event loop: futures and timer callbacks, no threads,
no polling task, no I/O.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from .errors import QueueFull, QueueTimeout

__all__ = ["Admission", "AdmissionStats", "Room", "Ticket"]

Room = Callable[[], int]
"""How many more requests the holders of an entry could start now (reservations not subtracted)."""

#: How often the waiters of an entry look at ``room`` again without a ``wake``.
RECHECK_S = 0.5
#: The weight of the newest wait in the mean behind ``Retry-After``.
_EWMA_ALPHA = 0.2


@dataclass(frozen=True, slots=True)
class AdmissionStats:
    """Counters since start (``waiting`` and ``reserved``: now)."""

    waiting: int
    reserved: int
    admitted_at_once: int
    admitted_after_wait: int
    timed_out: int
    refused_full: int  # refused on arrival, or pushed out by a key that waited for fewer places
    cancelled: int  # the client went away while waiting
    wait_s_total: float  # summed over the requests let through after waiting


class _Waiter:
    __slots__ = ("entry", "key", "room", "fut", "seq", "start", "queued", "pushed_out")

    def __init__(self, entry: str, key: str, room: Room, fut: asyncio.Future[None], seq: int, start: float) -> None:
        self.entry = entry
        self.key = key
        self.room = room
        self.fut = fut
        self.seq = seq  # arrival order, node-wide
        self.start = start
        self.queued = True
        self.pushed_out = False

    def granted(self) -> bool:
        """Handed a slot (its reservation is counted)."""
        return self.fut.done() and not self.fut.cancelled() and self.fut.exception() is None


class _Entry:
    """One entry's waiters: a ring of keys, each a FIFO of waiters; and its reservations."""

    __slots__ = ("keys", "waiting", "reserved", "timer")

    def __init__(self) -> None:
        self.keys: dict[str, deque[_Waiter]] = {}  # insertion order is the ring: the first key is next
        self.waiting = 0
        self.reserved = 0
        self.timer: asyncio.TimerHandle | None = None

    def head(self) -> _Waiter | None:
        for q in self.keys.values():
            return q[0]
        return None

    def pop_head(self) -> _Waiter:
        key, q = next(iter(self.keys.items()))
        w = q.popleft()
        del self.keys[key]
        if q:
            self.keys[key] = q  # to the back of the ring: the other keys go first
        self.waiting -= 1
        return w


class Ticket:
    """A request let through: its reservation, until ``claim()`` or ``release()``."""

    __slots__ = ("_admission", "entry", "key", "waited_s", "_open")

    def __init__(self, admission: Admission, entry: str, key: str, waited_s: float) -> None:
        self._admission = admission
        self.entry = entry
        self.key = key
        self.waited_s = waited_s  # 0.0: let through at once
        self._open = True

    def claim(self) -> None:
        """The request counts in a holder's ``in_flight`` now: the reservation ends. Idempotent."""
        if self._open:
            self._open = False
            self._admission._unreserve(self.entry, wake=False)

    def release(self) -> None:
        """The request will not take its slot: it goes to the next waiter. Idempotent; nothing after ``claim``."""
        if self._open:
            self._open = False
            self._admission._unreserve(self.entry, wake=True)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class Admission:
    """The per-entry, key-fair, bounded queue of requests waiting for a slot. See the module docstring."""

    def __init__(self, *, max_waiting: int, timeout_s: float, recheck_s: float = RECHECK_S) -> None:
        if max_waiting < 0 or timeout_s <= 0 or recheck_s <= 0:
            raise ValueError("max_waiting >= 0, timeout_s > 0 and recheck_s > 0")
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self.recheck_s = recheck_s
        self._entries: dict[str, _Entry] = {}
        self._per_key: dict[str, int] = {}  # waiting, all entries together
        self._waiting = 0
        self._seq = itertools.count()
        self._mean_wait_s = 0.0
        self._admitted_at_once = 0
        self._admitted_after_wait = 0
        self._timed_out = 0
        self._refused_full = 0
        self._cancelled = 0
        self._wait_s_total = 0.0

    # ------------------------------------------------------------------ the router's calls

    async def admit(self, entry: str, key: str, room: Room) -> Ticket:
        """Wait for a slot of ``entry``'s holders; the ticket holds it until ``claim()``.

        Raises ``QueueFull`` (no place to wait), ``QueueTimeout`` (no slot within
        ``timeout_s``); a cancellation leaves the queue at once.
        """
        self.wake(entry)  # a lost wake must not let this arrival overtake anyone
        e = self._entries.get(entry)
        if (e is None or e.waiting == 0) and room() - (e.reserved if e else 0) > 0:
            self._admitted_at_once += 1
            self._sample_wait(0.0)
            self._reserve(entry)
            return Ticket(self, entry, key, 0.0)
        if self._waiting >= self.max_waiting and not self._push_out_for(key, entry):
            self._refused_full += 1
            raise self._full(entry, waited_s=0.0)

        loop = asyncio.get_running_loop()
        start = loop.time()
        w = _Waiter(entry, key, room, loop.create_future(), next(self._seq), start)
        self._enqueue(w)
        w.fut.add_done_callback(lambda _f: self._leave(w))  # cancelled: out of the queue on the spot
        try:
            async with asyncio.timeout_at(start + self.timeout_s):
                await w.fut
        except TimeoutError:
            waited = loop.time() - start
            if w.granted():  # handed a slot just as the deadline passed: it is this request's
                return self._let_through(w, waited)
            self._leave(w)
            self._timed_out += 1
            self._sample_wait(self.timeout_s)
            raise QueueTimeout(entry, waited_s=waited, retry_after_s=self.retry_after_s()) from None
        except BaseException:  # the client went away, or pushed out (QueueFull)
            self._leave(w)
            if not w.pushed_out:  # counted where it was pushed out
                self._cancelled += 1
            if w.granted():  # its slot goes to the next waiter
                self._unreserve(entry, wake=True)
            raise
        return self._let_through(w, loop.time() - start)

    def wake(self, entry: str) -> None:
        """A slot of a holder of ``entry`` may have freed: hand the room to the waiters, in fair order."""
        e = self._entries.get(entry)
        while e is not None and e.waiting:
            w = e.head()
            assert w is not None
            if w.fut.done():  # cancelled a moment ago; its done callback has not run yet
                self._leave(w)
                continue
            if w.room() - e.reserved <= 0:
                break
            e.pop_head()
            w.queued = False
            self._forget(w.key)
            e.reserved += 1
            w.fut.set_result(None)
        if e is not None:
            self._tidy(entry, e)

    def wake_all(self) -> None:
        """What the holders say of their load is new (an engine's refresh): every entry's waiters may go."""
        for entry in list(self._entries):
            self.wake(entry)

    # ------------------------------------------------------------------ what can be read

    def depth(self, entry: str | None = None) -> int:
        """Requests waiting now: for ``entry``, or all entries together."""
        if entry is None:
            return self._waiting
        e = self._entries.get(entry)
        return e.waiting if e else 0

    def waiting_by_key(self, entry: str) -> dict[str, int]:
        """Requests waiting now for ``entry``, per key, in the order the keys take their next turns."""
        e = self._entries.get(entry)
        return {k: len(q) for k, q in e.keys.items()} if e else {}

    def retry_after_s(self) -> int:
        """The ``Retry-After`` of the queue's 429s, whole seconds (see the module docstring)."""
        return max(1, min(math.ceil(self._mean_wait_s), math.ceil(self.timeout_s)))

    def stats(self) -> AdmissionStats:
        return AdmissionStats(
            waiting=self._waiting,
            reserved=sum(e.reserved for e in self._entries.values()),
            admitted_at_once=self._admitted_at_once,
            admitted_after_wait=self._admitted_after_wait,
            timed_out=self._timed_out,
            refused_full=self._refused_full,
            cancelled=self._cancelled,
            wait_s_total=self._wait_s_total,
        )

    # ------------------------------------------------------------------ inside

    def _full(self, entry: str, *, waited_s: float) -> QueueFull:
        return QueueFull(entry, waiting=self._waiting, retry_after_s=self.retry_after_s(), waited_s=waited_s)

    def _let_through(self, w: _Waiter, waited: float) -> Ticket:
        self._admitted_after_wait += 1
        self._wait_s_total += waited
        self._sample_wait(waited)
        return Ticket(self, w.entry, w.key, waited)

    def _sample_wait(self, waited: float) -> None:
        self._mean_wait_s += _EWMA_ALPHA * (waited - self._mean_wait_s)

    def _reserve(self, entry: str) -> None:
        e = self._entries.get(entry)
        if e is None:
            e = self._entries[entry] = _Entry()
        e.reserved += 1

    def _unreserve(self, entry: str, *, wake: bool) -> None:
        e = self._entries[entry]
        e.reserved -= 1
        if wake:
            self.wake(entry)
        else:
            self._tidy(entry, e)

    def _enqueue(self, w: _Waiter) -> None:
        e = self._entries.get(w.entry)
        if e is None:
            e = self._entries[w.entry] = _Entry()
        e.keys.setdefault(w.key, deque()).append(w)
        e.waiting += 1
        self._waiting += 1
        self._per_key[w.key] = self._per_key.get(w.key, 0) + 1
        if e.timer is None:
            e.timer = asyncio.get_running_loop().call_later(self.recheck_s, self._recheck, w.entry)

    def _leave(self, w: _Waiter) -> None:
        """Take ``w`` out of its queue (idempotent)."""
        if not w.queued:
            return
        w.queued = False
        e = self._entries[w.entry]
        q = e.keys[w.key]
        q.remove(w)
        if not q:
            del e.keys[w.key]
        e.waiting -= 1
        self._forget(w.key)
        self._tidy(w.entry, e)

    def _forget(self, key: str) -> None:
        """One waiter of ``key`` is no longer waiting (node-wide counts)."""
        self._waiting -= 1
        left = self._per_key[key] - 1
        if left:
            self._per_key[key] = left
        else:
            del self._per_key[key]

    def _push_out_for(self, key: str, entry: str) -> bool:
        """Make a place for ``key`` in a full queue by pushing out the newest waiter of the key that waits
        for most places, if that key waits for more than ``key`` would with this arrival; else False."""
        if not self._per_key:
            return False
        top = max(self._per_key, key=self._per_key.__getitem__)
        if self._per_key[top] <= self._per_key.get(key, 0) + 1:
            return False
        newest = max(
            (e.keys[top][-1] for e in self._entries.values() if top in e.keys),
            key=lambda w: w.seq,
        )
        self._leave(newest)
        if not newest.fut.done():  # (else: cancelled a moment ago, and gone now all the same)
            newest.pushed_out = True
            self._refused_full += 1
            waited = asyncio.get_running_loop().time() - newest.start
            newest.fut.set_exception(self._full(newest.entry, waited_s=waited))
            newest.fut.exception()  # marked retrieved: the waiter may be cancelled before it looks
        return True

    def _recheck(self, entry: str) -> None:
        """The safety net: an entry with waiters looks at ``room`` again every ``recheck_s``."""
        e = self._entries.get(entry)
        if e is None:
            return
        e.timer = None
        try:
            self.wake(entry)
        finally:
            e = self._entries.get(entry)
            if e is not None and e.waiting and e.timer is None:
                e.timer = asyncio.get_running_loop().call_later(self.recheck_s, self._recheck, entry)

    def _tidy(self, entry: str, e: _Entry) -> None:
        """An entry with nobody waiting stops its timer; with no reservation either, it goes."""
        if e.waiting == 0:
            if e.timer is not None:
                e.timer.cancel()
                e.timer = None
            if e.reserved == 0:
                self._entries.pop(entry, None)
