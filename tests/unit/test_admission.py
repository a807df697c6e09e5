"""The admission queue: busy holders make requests wait their turn, fairly, boundedly, never past a deadline."""

from __future__ import annotations

import asyncio
import math
import random
import time

import pytest

from quorum_node.admission import Admission, Ticket
from quorum_node.errors import QueueFull, QueueTimeout

M = "llama3.2:latest"


class Holders:
    """The holders of one model, as the router sees them: a capacity, and requests running on them."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.running = 0
        self.most = 0

    def room(self) -> int:
        return self.capacity - self.running

    def begin(self, ticket: Ticket) -> None:
        self.running += 1
        self.most = max(self.most, self.running)
        assert self.running <= self.capacity, "over-admitted: more running than the holders' capacity"
        ticket.claim()

    def end(self, adm: Admission) -> None:
        self.running -= 1
        adm.wake(M)


async def occupy(adm: Admission, pool: Holders) -> list[Ticket]:
    """Fill every slot (admitted at once)."""
    out = []
    for _ in range(pool.room()):
        t = await adm.admit(M, "filler", pool.room)
        assert t.waited_s == 0.0
        pool.begin(t)
        out.append(t)
    return out


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def served_in_order(adm: Admission, pool: Holders, order: list[str]):
    async def request(key: str, label: str, work_s: float = 0.0) -> float:
        with await adm.admit(M, key, pool.room) as ticket:
            pool.begin(ticket)
        order.append(label)
        try:
            await asyncio.sleep(work_s)
        finally:
            pool.end(adm)
        return ticket.waited_s

    return request


# ------------------------------------------------------------------ order


async def test_a_light_key_is_not_stuck_behind_a_heavy_keys_backlog():
    adm = Admission(max_waiting=100, timeout_s=5)
    pool = Holders(1)
    order: list[str] = []
    request = served_in_order(adm, pool, order)
    await occupy(adm, pool)
    tasks = [asyncio.create_task(request("heavy", f"h{i}")) for i in range(20)]
    await settle()
    tasks += [asyncio.create_task(request("light", f"l{i}")) for i in range(2)]
    await settle()
    assert adm.depth(M) == 22 and adm.waiting_by_key(M) == {"heavy": 20, "light": 2}

    pool.end(adm)  # the filler ends: from now on each ending request hands its slot on
    await asyncio.gather(*tasks)
    assert order.index("l0") < 4 and order.index("l1") < 4, order
    assert [x for x in order if x.startswith("h")] == [f"h{i}" for i in range(20)]  # FIFO within a key
    assert adm.depth() == 0 and adm.stats().reserved == 0


async def test_requests_of_one_key_are_served_first_in_first_out():
    adm = Admission(max_waiting=100, timeout_s=5)
    pool = Holders(2)
    order: list[str] = []
    request = served_in_order(adm, pool, order)
    fillers = await occupy(adm, pool)
    tasks = []
    for i in range(8):
        tasks.append(asyncio.create_task(request("k", str(i), 0.001)))
        await asyncio.sleep(0)
    await settle()
    for _ in fillers:
        pool.end(adm)
    await asyncio.gather(*tasks)
    assert order == [str(i) for i in range(8)]


async def test_an_arrival_does_not_overtake_a_waiter_even_when_a_wake_was_lost():
    adm = Admission(max_waiting=10, timeout_s=5)
    pool = Holders(1)
    order: list[str] = []
    request = served_in_order(adm, pool, order)
    await occupy(adm, pool)
    first = asyncio.create_task(request("a", "waited", 0.05))
    await settle()
    pool.running -= 1  # the filler ends, and nobody calls wake
    second = asyncio.create_task(request("b", "arrived", 0.0))
    await asyncio.gather(first, second)
    assert order == ["waited", "arrived"]
    assert pool.most == 1


# ------------------------------------------------------------------ bounds and deadlines


async def test_a_full_queue_refuses_with_429_and_retry_after():
    adm = Admission(max_waiting=2, timeout_s=5)
    pool = Holders(1)
    await occupy(adm, pool)
    waiting = [asyncio.create_task(adm.admit(M, "k", pool.room)) for _ in range(2)]
    await settle()
    with pytest.raises(QueueFull) as info:
        await adm.admit(M, "k", pool.room)
    err = info.value
    assert (err.status, err.type, err.code) == (429, "rate_limit_error", "queue_full")
    assert int(err.headers["Retry-After"]) >= 1
    assert f"`{M}`" in err.message and "2 requests are waiting" in err.message and "try again in" in err.message
    assert err.retryable
    assert adm.depth() == 2 and adm.stats().refused_full == 1
    for t in waiting:
        t.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert adm.depth() == 0


async def test_with_queueing_off_busy_is_429_at_once():
    adm = Admission(max_waiting=0, timeout_s=5)
    pool = Holders(1)
    await occupy(adm, pool)
    started = time.monotonic()
    with pytest.raises(QueueFull) as info:
        await adm.admit(M, "", pool.room)
    assert time.monotonic() - started < 0.05
    assert "keeps no requests waiting" in info.value.message


async def test_a_flooding_key_cannot_lock_other_keys_out_of_a_full_queue():
    adm = Admission(max_waiting=4, timeout_s=5)
    pool = Holders(1)
    await occupy(adm, pool)
    heavy = [asyncio.create_task(adm.admit(M, "heavy", pool.room)) for _ in range(4)]
    await settle()
    light = asyncio.create_task(adm.admit(M, "light", pool.room))
    await settle()
    assert heavy[-1].done() and isinstance(heavy[-1].exception(), QueueFull)  # its newest gave way
    assert adm.waiting_by_key(M) == {"heavy": 3, "light": 1}
    assert not light.done()
    with pytest.raises(QueueFull):  # the heavy key may not push anyone out: it waits for most already
        await adm.admit(M, "heavy", pool.room)
    for t in [*heavy, light]:
        t.cancel()
    await asyncio.gather(*heavy, light, return_exceptions=True)
    assert adm.depth() == 0


async def test_nobody_waits_past_the_deadline():
    adm = Admission(max_waiting=10, timeout_s=0.2)
    pool = Holders(1)
    await occupy(adm, pool)

    async def wait_for_slot() -> float:
        started = time.monotonic()
        with pytest.raises(QueueTimeout) as info:
            await adm.admit(M, "k", pool.room)
        waited = time.monotonic() - started
        err = info.value
        assert (err.status, err.type, err.code) == (429, "rate_limit_error", "queue_timeout")
        assert 1 <= int(err.headers["Retry-After"]) <= math.ceil(adm.timeout_s)
        assert abs(err.waited_s - waited) < 0.05 and "stayed busy" in err.message
        return waited

    tasks = []
    for _ in range(3):
        tasks.append(asyncio.create_task(wait_for_slot()))
        await asyncio.sleep(0.05)
    waits = await asyncio.gather(*tasks)
    assert all(0.2 <= w < 0.35 for w in waits), waits
    assert adm.depth() == 0 and adm.stats().timed_out == 3


# ------------------------------------------------------------------ clients that go away


async def test_a_client_that_goes_away_leaves_the_queue_and_the_next_gets_the_slot():
    adm = Admission(max_waiting=10, timeout_s=5)
    pool = Holders(1)
    order: list[str] = []
    request = served_in_order(adm, pool, order)
    await occupy(adm, pool)
    gone = asyncio.create_task(request("a", "gone"))
    await settle()
    stays = asyncio.create_task(request("a", "stays"))
    await settle()
    assert adm.depth(M) == 2
    gone.cancel()
    await asyncio.sleep(0)
    assert adm.depth(M) == 1
    pool.end(adm)
    await stays
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert order == ["stays"]
    assert adm.stats().cancelled == 1 and adm.stats().reserved == 0


async def test_a_client_gone_after_being_handed_a_slot_passes_it_on():
    adm = Admission(max_waiting=10, timeout_s=5)
    pool = Holders(1)
    order: list[str] = []
    request = served_in_order(adm, pool, order)
    await occupy(adm, pool)
    handed = asyncio.create_task(request("a", "handed"))
    await settle()
    nxt = asyncio.create_task(request("b", "next"))
    await settle()
    pool.end(adm)  # "handed" is handed the slot...
    assert adm.depth(M) == 1 and adm.stats().reserved == 1
    handed.cancel()  # ...and goes away before it runs
    await nxt
    with pytest.raises(asyncio.CancelledError):
        await handed
    assert order == ["next"]
    assert pool.most == 1 and adm.stats().reserved == 0


async def test_a_released_ticket_passes_its_slot_on():
    adm = Admission(max_waiting=10, timeout_s=5)
    pool = Holders(1)
    first = await adm.admit(M, "a", pool.room)
    waiter = asyncio.create_task(adm.admit(M, "b", pool.room))
    await settle()
    assert not waiter.done()  # the reservation counts against the room
    first.release()  # say no holder would take it after all
    ticket = await waiter
    assert ticket.waited_s > 0
    pool.begin(ticket)
    assert adm.stats().reserved == 0


# ------------------------------------------------------------------ capacity


async def test_never_more_running_than_the_holders_capacity():
    adm = Admission(max_waiting=1000, timeout_s=5)
    pool = Holders(3)
    rng = random.Random(21)

    async def request(key: str) -> None:
        with await adm.admit(M, key, pool.room) as ticket:
            for _ in range(rng.randrange(3)):  # the router has its own awaits before the slot is taken
                await asyncio.sleep(0)
            if rng.random() < 0.1:
                return  # gave up before taking the slot: released by the `with`
            pool.begin(ticket)
        try:
            await asyncio.sleep(rng.uniform(0, 0.01))
        finally:
            pool.end(adm)

    tasks = []
    for i in range(120):
        tasks.append(asyncio.create_task(request(f"k{i % 4}")))
        if rng.random() < 0.3:
            await asyncio.sleep(rng.uniform(0, 0.003))
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert pool.most == 3  # full use, never more
    stats = adm.stats()
    assert stats.admitted_at_once + stats.admitted_after_wait == 120 and stats.admitted_after_wait > 0
    assert stats.waiting == 0 and stats.reserved == 0 and stats.wait_s_total > 0


async def test_a_lost_wake_is_recovered_by_the_periodic_recheck():
    adm = Admission(max_waiting=10, timeout_s=5)
    capacity = 0  # a peer reports its capacity later, and nobody calls wake

    def room() -> int:
        return capacity

    waiter = asyncio.create_task(adm.admit(M, "k", room))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    capacity = 1
    ticket = await asyncio.wait_for(waiter, 1.0)
    assert 0.1 <= ticket.waited_s < 0.7
    ticket.claim()
