"""Waiting on an event with a time limit, with a cancellation always kept.

Python 3.11's `asyncio.wait_for` returns normally when the task is cancelled in the same
loop turn as the awaited event is set (gh-86296), so a loop of "wait for a wake-up or the
next round" could go on running after it was cancelled: a stopped webhook sender kept
polling, and its stop waited for ever. `asyncio.timeout` keeps the cancellation."""

from __future__ import annotations

import asyncio


async def event_or_timeout(event: asyncio.Event, timeout: float) -> bool:
    """True when `event` is set within `timeout` seconds, False when the time runs out; a
    cancellation of the waiting task always propagates."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
