"""A real agent data path for the protocol tests: the runtime (its MQTT link and the site
sources the config names) serving a bundle, with every verdict recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig
from edge_agent.decisions import RAISED, AlertEvent, Verdict
from edge_agent.outbox import Outbox
from edge_agent.runtime import EdgeRuntime
from edge_agent.serving import open_serving
from tests.support.agents import wait_for


class SiteAgent:
    def __init__(self, tmp_path: Path, config: AgentConfig, bundle: Path, key: Any) -> None:
        self.model = open_serving(
            bundle, key.public_key(), config.model, tmp_path / "m", tmp_path / "e"
        )
        self.outbox = Outbox(config.state_dir / "outbox.sqlite3", 1 << 24)
        self.verdicts: list[Verdict] = []
        self.runtime = EdgeRuntime(
            config, self.model, self.outbox, "agent-1", self.verdicts.append, device="edge-1"
        )
        self._stopped = False

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.runtime.stop()

    def close(self) -> None:
        self.stop()
        self.outbox.close()
        self.model.close()

    def first_alert(self, after: float) -> AlertEvent:
        """The first alert event, once scored: a raise after `after` (the fault's start)."""
        wait_for(lambda: any(v.event is not None for v in self.verdicts), timeout=120)
        assert self.runtime.counters.windows_scored > 0
        first = next(v.event for v in self.verdicts if v.event is not None)
        assert first.kind == RAISED and first.window_end > after, first
        return first
