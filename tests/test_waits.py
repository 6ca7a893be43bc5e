"""event_or_timeout keeps a cancellation that arrives as the event is set (Python 3.11's
asyncio.wait_for returned normally then, so a cancelled polling loop ran on)."""

from __future__ import annotations

import asyncio

import pytest

from edge_agent.waits import event_or_timeout

pytestmark = pytest.mark.unit


def test_a_cancel_in_the_same_turn_as_the_wake_up_is_kept() -> None:
    async def main() -> str:
        event = asyncio.Event()

        async def waiter() -> str:
            await event_or_timeout(event, 10)
            return "returned"

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0)
        event.set()
        task.cancel()
        try:
            return await task
        except asyncio.CancelledError:
            return "cancelled"

    assert asyncio.run(main()) == "cancelled"


def test_it_says_whether_the_event_came_or_the_time_ran_out() -> None:
    async def main() -> tuple[bool, bool]:
        event = asyncio.Event()
        late = await event_or_timeout(event, 0.01)
        event.set()
        return late, await event_or_timeout(event, 10)

    assert asyncio.run(main()) == (False, True)
