"""Per-key locks: one holder per key at a time, and nothing kept once nobody holds one."""

from __future__ import annotations

import asyncio

from sipis.keyed_lock import KeyedLock


async def test_holders_of_one_key_take_turns_and_other_keys_run_alongside() -> None:
    locks = KeyedLock()
    trace: list[str] = []

    async def work(key: str, name: str) -> None:
        async with locks.hold(key):
            trace.append(f"{name} in")
            await asyncio.sleep(0.01)
            trace.append(f"{name} out")

    await asyncio.gather(work("a", "a1"), work("a", "a2"), work("b", "b1"))
    assert trace.index("a1 out") < trace.index("a2 in")
    assert trace.index("b1 in") < trace.index("a1 out")


async def test_a_lock_is_forgotten_once_its_last_holder_or_waiter_is_done() -> None:
    locks = KeyedLock()
    entered = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with locks.hold("a"):
            entered.set()
            await release.wait()

    async def waiter() -> None:
        async with locks.hold("a"):
            pass

    first = asyncio.ensure_future(holder())
    await entered.wait()
    second = asyncio.ensure_future(waiter())
    await asyncio.sleep(0)
    assert len(locks) == 1
    release.set()
    await asyncio.gather(first, second)
    assert len(locks) == 0


async def test_a_holder_that_fails_or_is_cancelled_lets_go() -> None:
    locks = KeyedLock()
    try:
        async with locks.hold("a"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert len(locks) == 0
    blocker = asyncio.Event()

    async def stuck() -> None:
        async with locks.hold("a"):
            await blocker.wait()

    task = asyncio.ensure_future(stuck())
    await asyncio.sleep(0)
    waiting = asyncio.ensure_future(stuck())
    await asyncio.sleep(0)
    waiting.cancel()
    task.cancel()
    await asyncio.gather(task, waiting, return_exceptions=True)
    assert len(locks) == 0
    async with asyncio.timeout(1):
        async with locks.hold("a"):
            pass
