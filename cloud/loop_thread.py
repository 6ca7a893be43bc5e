"""An asyncio event loop in a thread of its own, and the one way such a loop is ended:
async generators and the default executor shut down, the loop stopped and closed, so that
no worker thread or descriptor outlives it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


async def _wind_down(loop: asyncio.AbstractEventLoop) -> None:
    await loop.shutdown_asyncgens()
    await loop.shutdown_default_executor()


def end_loop(
    loop: asyncio.AbstractEventLoop, thread: threading.Thread, timeout: float = 10
) -> None:
    """Ends `loop`, run by `thread` (with run_forever, or a run_until_complete that has
    returned: a running one would be stopped before its future is done): its executor's
    threads joined, the loop closed once the thread is gone. A step that does not finish
    within `timeout` is logged and the rest still done."""
    if loop.is_closed():
        return
    if loop.is_running():
        done = asyncio.run_coroutine_threadsafe(_wind_down(loop), loop)
        try:
            done.result(timeout)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            log.warning("the event loop's executor did not shut down: %r", exc)
        with contextlib.suppress(RuntimeError):  # closed meanwhile by its own thread
            loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout)
    if thread.is_alive():
        log.warning("the event loop thread %s did not end within %.0f s", thread.name, timeout)
        return
    if not loop.is_closed():
        loop.run_until_complete(_wind_down(loop))
        loop.close()


class LoopThread:
    """An event loop running for ever in a daemon thread; `run` calls into it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self, timeout: float = 10) -> None:
        end_loop(self.loop, self.thread, timeout)
