"""What the agent reports of a shadow candidate while it has nothing to compare it on.

The recent rows the comparison runs on are kept in memory only: after a restart (or before
the first rows of a soak) there are too few to calibrate and score both models. Such an
evaluation measured nothing, and a report of 0 windows moves nothing on the control plane, so
it is not sent. A candidate that cannot be compared with the serving model at all (other
sensors, another period) is still reported, with why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edge_agent.config import ModelChoice
from edge_agent.inference.base import InferenceBackend
from edge_agent.shadow import RowHistory
from edge_agent.slots import ModelSlots, SlotInfo
from edge_agent.updates import ModelUpdater, ShadowModel
from protos.autoglm.v1 import agent_pb2

pytestmark = pytest.mark.unit

SENSORS = ("flow", "pressure")
CALIBRATION_ROWS = 50
EVALUATIONS = 3  # evaluations waited for before the reports are looked at
WAIT_S = 60.0


def _model(version: str, sensors: tuple[str, ...] = SENSORS) -> Any:
    """What the shadow evaluation reads of a serving model before it scores anything."""
    return SimpleNamespace(
        version=version,
        schema=SimpleNamespace(names=sensors),
        spec=SimpleNamespace(period_s=1.0),
        manifest=SimpleNamespace(name="pump", calibration_rows=CALIBRATION_ROWS),
        choice=SimpleNamespace(label="fake"),
        close=lambda: None,
    )


class ShadowingAgent:
    """What `ModelUpdater` uses of an agent serving version 1, its runtime's assets holding
    `rows` recent rows each."""

    def __init__(self, root: Path, rows: int) -> None:
        self.model = _model("1")
        self.slots = ModelSlots(root / "models")
        self.key = None
        self.config = SimpleNamespace(
            state_dir=root,
            model=ModelChoice(),
            shadow=SimpleNamespace(interval_s=0.01),
            updates=SimpleNamespace(retry_initial_s=0.01, retry_max_s=0.02, download_attempts=2),
        )
        self.posted: list[agent_pb2.AgentMessage] = []
        self.session = SimpleNamespace(
            post=self.posted.append, address="stub", credentials=lambda: None, tls_server_name=""
        )
        history = RowHistory(1000, len(SENSORS))
        if rows:
            values = np.ones((rows, len(SENSORS)), dtype=np.float32)
            history.extend(7, values, np.ones_like(values))
        self.runtime = SimpleNamespace(
            runners=[SimpleNamespace(history=history)],
            run_on_inference_thread=self._run_on_inference_thread,
        )

    def _run_on_inference_thread(self, task: Callable[[InferenceBackend], None]) -> None:
        raise AssertionError("the incumbent was run on rows too few to compare on")


def _shadow_reports(agent: ShadowingAgent, candidate: Any) -> list[agent_pb2.ShadowReport]:
    """The shadow reports posted over EVALUATIONS evaluations of `candidate` in shadow."""
    updater = ModelUpdater(agent)  # type: ignore[arg-type]
    updater.shadow = ShadowModel(candidate, SlotInfo("b", "pump", candidate.version, "", "r2"))
    evaluate = updater._evaluate

    async def loop() -> None:
        done = asyncio.Event()
        running = asyncio.get_running_loop()
        count = 0
        failures: list[BaseException] = []

        def counted(current: ShadowModel) -> agent_pb2.ShadowReport | None:
            nonlocal count
            try:
                return evaluate(current)
            except BaseException as exc:
                failures.append(exc)
                raise
            finally:
                count += 1
                if count >= EVALUATIONS:
                    running.call_soon_threadsafe(done.set)

        updater._evaluate = counted  # type: ignore[method-assign]
        task = asyncio.create_task(updater._shadow_loop())
        try:
            await asyncio.wait_for(done.wait(), WAIT_S)
        except TimeoutError:
            raise AssertionError(f"{count} evaluation(s) in {WAIT_S}s") from None
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert failures == [], f"evaluations failed: {failures}"

    asyncio.run(loop())
    return [m.shadow for m in agent.posted if m.WhichOneof("body") == "shadow"]


@pytest.mark.parametrize("rows", [0, 10], ids=["no rows since a restart", "too few rows"])
def test_nothing_compared_for_want_of_rows_is_not_reported(tmp_path: Path, rows: int) -> None:
    agent = ShadowingAgent(tmp_path, rows)
    reports = _shadow_reports(agent, _model("2"))
    assert reports == [], f"reports of nothing measured were sent: {reports}"


def test_a_candidate_that_cannot_be_compared_is_reported_with_why(tmp_path: Path) -> None:
    agent = ShadowingAgent(tmp_path, 0)
    reports = _shadow_reports(agent, _model("2", ("flow", "temperature")))
    assert len(reports) >= EVALUATIONS, reports
    report = reports[0]
    assert (report.rollout_id, report.candidate_version, report.windows) == ("r2", "2", 0)
    assert "sensors differ" in report.detail, report.detail
