"""Admission control for agent session setups: a bounded number at a time, the rest refused
at once with a hint of when to come back.

A fleet reconnecting at one moment (the control plane restarted) otherwise queues thousands
of setups behind the database: each waits past the agent's hello timeout, is abandoned and
retried, and the work done for it is lost. Refused early, an agent costs a TLS handshake and
no query, and the hint spreads the fleet over the time the plane needs to take it.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator

from edge_agent.errors import RateLimited

DEFAULT_SETUP_LIMIT = 64  # session setups at once (the config's `max_session_setups`)
RATE_WINDOW_S = 5.0  # setups finished and refused are counted over this window
MIN_HINT_S = 1.0
MAX_HINT_S = 60.0


class SessionAdmission:
    """At most `limit` session setups at once (event loop only). A setup beyond that is
    refused with `RateLimited` whose `retry_after_s` is the time the plane needs, at its
    recent setup rate, for the agents refused lately (at least 1 s, at most 60 s)."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1:
            raise ValueError("admission needs a limit of at least 1")
        self.limit = limit
        self.clock = clock
        self.in_setup = 0
        self.refused_total = 0
        self._finished: deque[float] = deque()
        self._refused: deque[float] = deque()

    @contextlib.contextmanager
    def setup(self) -> Iterator[None]:
        """Holds one of the setup places for the block; RateLimited when none is free."""
        now = self.clock()
        self._prune(now)
        if self.in_setup >= self.limit:
            self._refused.append(now)
            self.refused_total += 1
            hint = self.retry_after_s()
            raise RateLimited(
                f"the control plane is busy opening {self.in_setup} sessions; "
                f"try again in {hint:.0f} s",
                retry_after_s=hint,
            )
        self.in_setup += 1
        try:
            yield
        finally:
            self.in_setup -= 1
            self._finished.append(self.clock())

    def retry_after_s(self) -> float:
        """When a refused agent should come back: the agents refused in the window, at the
        rate setups finished in it (or `limit` a second before any has)."""
        self._prune(self.clock())
        rate = len(self._finished) / RATE_WINDOW_S if self._finished else float(self.limit)
        return min(MAX_HINT_S, max(MIN_HINT_S, len(self._refused) / max(rate, 1.0)))

    def _prune(self, now: float) -> None:
        for times in (self._finished, self._refused):
            while times and now - times[0] > RATE_WINDOW_S:
                times.popleft()
