"""Admission: running/queued accounting, 429 when full, and no place leaks on any path."""

from __future__ import annotations

import asyncio

import pytest

from schemas.errors import RateLimitError
from service.admission import Admission, Slot


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(5):
        await asyncio.sleep(0)


def counts(admission: Admission) -> tuple[int, int]:
    """(running, queued)."""
    return admission.running, admission.queued


def flags(slot: Slot) -> tuple[bool, bool]:
    """(running, released) of one slot."""
    return slot.running, slot.released


async def test_reserve_acquire_release_accounting() -> None:
    """A place is queued when reserved, running when acquired, and gone when released."""
    admission = Admission(max_concurrency=2, max_queue=1)
    slot = admission.reserve()
    assert counts(admission) == (0, 1)
    assert flags(slot) == (False, False)
    await slot.acquire()
    assert counts(admission) == (1, 0)
    assert flags(slot) == (True, False)
    slot.release()
    assert counts(admission) == (0, 0)
    assert flags(slot) == (True, True)


async def test_full_admission_answers_429_with_retry_after() -> None:
    """Past max_concurrency + max_queue places, reserve raises a 429 with Retry-After."""
    admission = Admission(max_concurrency=1, max_queue=1)
    running = admission.reserve()
    await running.acquire()
    queued = admission.reserve()
    with pytest.raises(RateLimitError) as info:
        admission.reserve()
    assert info.value.status_code == 429
    assert info.value.code == "queue_full"
    assert info.value.headers["Retry-After"]
    assert "1 running, 1 queued" in info.value.message
    assert counts(admission) == (1, 1)
    queued.release()
    admission.reserve().release()  # the freed queue place can be taken again
    running.release()


async def test_queued_request_waits_for_a_running_one() -> None:
    """With every slot taken a request stays queued until a running one releases."""
    admission = Admission(max_concurrency=1, max_queue=4)
    first = admission.reserve()
    await first.acquire()
    second = admission.reserve()
    waiter = asyncio.create_task(second.acquire())
    await settle()
    assert not waiter.done()
    assert counts(admission) == (1, 1)
    first.release()
    await asyncio.wait_for(waiter, timeout=5)
    assert counts(admission) == (1, 0)
    assert second.running
    second.release()
    assert counts(admission) == (0, 0)


async def test_cancelled_while_queued_returns_the_place() -> None:
    """A request cancelled while waiting frees its queue place and takes no slot."""
    admission = Admission(max_concurrency=1, max_queue=1)
    first = admission.reserve()
    await first.acquire()
    second = admission.reserve()
    waiter = asyncio.create_task(second.acquire())
    await settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    second.release()  # what every caller's `finally` does
    assert counts(admission) == (1, 0)
    first.release()
    third = admission.reserve()
    await asyncio.wait_for(third.acquire(), timeout=5)  # the slot did not leak
    assert counts(admission) == (1, 0)
    third.release()
    assert counts(admission) == (0, 0)


async def test_released_while_queued_gives_the_slot_straight_back() -> None:
    """A place released while it waits hands the slot on when it gets one, never running."""
    admission = Admission(max_concurrency=1, max_queue=2)
    first = admission.reserve()
    await first.acquire()
    gone = admission.reserve()
    waiter = asyncio.create_task(gone.acquire())
    await settle()
    gone.release()
    assert counts(admission) == (1, 0)
    first.release()
    await asyncio.wait_for(waiter, timeout=5)
    assert not gone.running
    assert counts(admission) == (0, 0)
    nxt = admission.reserve()
    await asyncio.wait_for(nxt.acquire(), timeout=5)
    assert counts(admission) == (1, 0)
    nxt.release()


async def test_release_is_idempotent() -> None:
    """Releasing twice (queued or running) never counts a place twice."""
    admission = Admission(max_concurrency=2, max_queue=2)
    queued = admission.reserve()
    queued.release()
    queued.release()
    running = admission.reserve()
    await running.acquire()
    running.release()
    running.release()
    assert counts(admission) == (0, 0)
    slots = [admission.reserve() for _ in range(2)]
    for slot in slots:
        await asyncio.wait_for(slot.acquire(), timeout=5)
    assert counts(admission) == (2, 0)  # both slots are still there after the double releases
    for slot in slots:
        slot.release()


async def test_many_requests_drain_to_zero() -> None:
    """Any mix of finished, cancelled and released-early requests leaves nothing counted."""
    admission = Admission(max_concurrency=2, max_queue=20)

    async def request(i: int, slot: Slot) -> None:
        try:
            await slot.acquire()
            await asyncio.sleep(0)
        finally:
            slot.release()

    slots = [admission.reserve() for _ in range(12)]
    tasks = [asyncio.create_task(request(i, s)) for i, s in enumerate(slots)]
    await settle()
    for task in tasks[3::3]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert counts(admission) == (0, 0)
    extra = [admission.reserve() for _ in range(2)]
    for slot in extra:
        await asyncio.wait_for(slot.acquire(), timeout=5)
    assert counts(admission) == (2, 0)
    for slot in extra:
        slot.release()
