"""Ending a call the plane gave up on (a session it ended, a download not read): its status is
handed to gRPC in the background and its task is cancelled, so what it held is released now
and not when its peer reads or leaves."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from grpc import aio

from cloud.service.guard import status_of
from edge_agent.errors import AutoglmError

log = logging.getLogger(__name__)


async def send_status(context: aio.ServicerContext[Any, Any], error: AutoglmError) -> None:
    """Hands an ended call's status to gRPC and waits for it to go out (the peer reads what
    was queued before it) or for the call to end (it left, or its deadline passed)."""
    try:
        await context.abort(*status_of(error))
    except (aio.AbortError, aio.UsageError):
        return  # sent; or the call's own end got there first (an abort under way)
    except Exception as exc:  # noqa: BLE001 - the call ended without it: nobody to tell
        log.debug("the status of an ended call was not sent: %r", exc)


def cut(
    context: aio.ServicerContext[Any, Any],
    call: asyncio.Task[Any],
    error: AutoglmError,
    background: set[asyncio.Task[None]],
) -> None:
    """Ends `call` (its handler's task) with `error`: the status goes out behind what its peer
    has not read, in a task kept in `background`; the pending write is dropped (the handler's
    generator is closed when collected)."""
    status = asyncio.create_task(send_status(context, error))
    background.add(status)
    status.add_done_callback(background.discard)
    call.cancel()
