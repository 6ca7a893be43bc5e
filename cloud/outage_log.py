"""How a background job that retries on its own reports an unavailable store: one warning
line when it starts failing, then at most one a period with the count left unreported, and
one line when it works again, instead of a traceback at every retry."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

OUTAGE_REPORT_S = 60.0


class OutageLog:
    """The Unavailable failures of one background job, reported sparingly to `log`."""

    def __init__(
        self,
        log: logging.Logger,
        job: str,
        every_s: float = OUTAGE_REPORT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.job = job
        self.every_s = every_s
        self.clock = clock
        self.failures = 0  # since the job last worked
        self._unreported = 0
        self._next_report = 0.0

    def failed(self, error: Exception, retry_s: float) -> None:
        self.failures += 1
        now = self.clock()
        if self.failures > 1 and now < self._next_report:
            self._unreported += 1
            return
        more = (
            f" ({self._unreported} more failure(s) since the last line)" if self._unreported else ""
        )
        self.log.warning("%s: %s; retrying every %.1fs%s", self.job, error, retry_s, more)
        self._unreported, self._next_report = 0, now + self.every_s

    def worked(self) -> None:
        if self.failures:
            self.log.info("%s works again after %d failure(s)", self.job, self.failures)
            self.failures, self._unreported = 0, 0
