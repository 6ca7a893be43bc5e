"""An operator stream's caller is checked again while it runs: a check the store cannot
answer for a moment (Unavailable) keeps the last good caller for a grace, then ends the
stream; a revoked token (Unauthenticated) ends it at once. The lookup is injected; the clock
too."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cloud.service.guard import RECHECK_GRACE_S, _rechecked
from edge_agent.errors import AutoglmError, PermissionDenied, Unauthenticated, Unavailable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def _numbers() -> AsyncIterator[int]:
    n = 0
    while True:
        n += 1
        yield n


def _run(failure: AutoglmError, clock: Clock, steps: list[float]) -> tuple[list[int], str]:
    """Reads one item per step, advancing the clock by it, with every check failing."""

    async def fail() -> None:
        raise failure

    async def main() -> tuple[list[int], str]:
        got: list[int] = []
        stream = _rechecked(_numbers(), fail, every_s=5.0, clock=clock)
        try:
            for step in steps:
                clock.now += step
                got.append(await anext(stream))
        except AutoglmError as exc:
            return got, type(exc).__name__
        finally:
            await stream.aclose()
        return got, ""

    return asyncio.run(main())


def test_a_store_briefly_unavailable_keeps_the_stream_for_the_grace_then_ends_it() -> None:
    clock = Clock()
    half = RECHECK_GRACE_S / 2
    got, ended = _run(Unavailable("database away (injected)"), clock, [0.0, half, half, 1.0])
    assert got == [1, 2, 3] and ended == "Unavailable", (got, ended)


@pytest.mark.parametrize(
    "failure",
    [Unauthenticated("token revoked (injected)"), PermissionDenied("role removed (injected)")],
)
def test_a_refused_caller_ends_the_stream_at_once(failure: AutoglmError) -> None:
    got, ended = _run(failure, Clock(), [0.0, 0.0])
    assert got == [] and ended == type(failure).__name__, (got, ended)
