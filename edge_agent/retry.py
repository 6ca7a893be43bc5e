"""Backoff policies as objects: injected where something retries, never sprinkled sleeps."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Jittered exponential backoff: initial, initial*multiplier, ... capped at maximum.

    `full_jitter`: each delay is drawn from [initial, step] instead of step * [1 - jitter,
    1 + jitter]. Many clients failing at the same moment (a fleet when its control plane
    restarts) then come back spread over the whole step rather than in waves a step apart.
    The floor at `initial_s` (pure full jitter draws from 0) keeps the step from climbing
    while the peer is down: draws near 0 gave agents five or six failures in a 3 s outage,
    then waits of up to a minute (tests/benchmarks/bench_heartbeats.py --storm).
    """

    initial_s: float = 1.0
    maximum_s: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.2  # each delay is scaled by a factor in [1 - jitter, 1 + jitter]
    full_jitter: bool = False
    rng: random.Random = field(default_factory=random.Random)
    _attempt: int = 0

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.maximum_s < self.initial_s:
            raise ValueError("backoff needs 0 < initial_s <= maximum_s")
        if self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError("backoff needs multiplier >= 1 and 0 <= jitter < 1")

    def next_delay(self) -> float:
        """The delay before the next attempt; each call moves one step up the curve."""
        self._attempt += 1
        return self.delay(self._attempt)

    def delay(self, attempt: int) -> float:
        """The delay after failed attempt number `attempt` (1, 2, ...), for retries whose
        count is kept elsewhere (a database row) rather than in this object."""
        steps = min(max(0, attempt - 1), 64)  # far past any cap; more would only overflow
        base = min(self.maximum_s, self.initial_s * self.multiplier**steps)
        if self.full_jitter:  # the first draw too spans a step: the fleet does not return as one
            top = min(self.maximum_s, max(base, self.initial_s * self.multiplier))
            return self.rng.uniform(self.initial_s, top)
        return base * self.rng.uniform(1 - self.jitter, 1 + self.jitter)

    def after_hint(self, hint_s: float) -> float:
        """The wait a peer's retry hint asks for, spread +-50 % (those it refused together do
        not return together), never past the ceiling whatever the hint says."""
        return min(self.maximum_s, hint_s * self.rng.uniform(0.5, 1.5))

    def reset(self) -> None:
        """Back to the first step, after a success."""
        self._attempt = 0

    def exhaust(self) -> None:
        """Jumps to the longest delay, for failures that retrying soon cannot fix."""
        while self.initial_s * self.multiplier**self._attempt < self.maximum_s:
            self._attempt += 1
            if self.multiplier == 1:
                break
