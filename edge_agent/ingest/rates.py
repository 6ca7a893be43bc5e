"""Message rates per asset: a token bucket each, checked before a message is decoded.

All MQTT messages go through one network thread (paho's). An asset publishing far faster
than sensors do (a misconfigured PLC, a hostile publisher) had every message decoded, handed
to the pipeline and aligned, and nothing said so. Past its rate, an asset's messages are
dropped before any decoding, for a dictionary lookup and a few comparisons, and counted
(`rate_limited`). What paho and the broker spend on them stays: a flood faster than paho
reads still delays the other assets' messages in the broker's queue (README, "Broker").
"""

from __future__ import annotations


class MessageRates:
    """`per_s` messages a second for each asset on average, and bursts of `burst_s` seconds
    of them at once (a gateway flushing what it gathered, a broker's short backlog)."""

    def __init__(self, assets: int, per_s: float, burst_s: float) -> None:
        self.per_s = per_s
        self.capacity = max(1.0, per_s * burst_s)
        self._tokens = [self.capacity] * assets
        self._at = [0.0] * assets  # when each bucket was last filled up to now (monotonic s)

    def admit(self, asset: int, now: float) -> bool:
        """Whether one more message of `asset` at `now` (monotonic seconds) is within its
        rate; the network thread's only caller, so no lock."""
        tokens = self._tokens[asset]
        if tokens < self.capacity:
            tokens = min(self.capacity, tokens + (now - self._at[asset]) * self.per_s)
        self._at[asset] = now
        if tokens >= 1.0:
            self._tokens[asset] = tokens - 1.0
            return True
        self._tokens[asset] = tokens
        return False

    def raise_to(self, per_s: float) -> None:
        """At least `per_s` messages a second (and bursts to match): what the model's assets
        may send in normal operation is never a flood."""
        if per_s <= self.per_s:
            return
        scale = per_s / self.per_s
        self.per_s = per_s
        self.capacity *= scale
        self._tokens = [tokens * scale for tokens in self._tokens]
