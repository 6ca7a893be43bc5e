"""A swap whose new model cannot start, and whose old model cannot start again either: the
agent says so loudly, keeps the data path running without a model, and tries the old model
again until it serves (never nothing, silently)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from edge_agent import agent as agent_mod
from edge_agent.agent import Agent
from edge_agent.errors import LocalStateError


class Runtime:
    def __init__(self, model: Any, fails: list[Any]) -> None:
        self.model = model
        self.fails = fails
        self.running = False

    def start(self) -> None:
        if any(self.model is f for f in self.fails):
            raise LocalStateError(f"cannot start on {self.model}")
        self.running = True

    def stop(self) -> None:
        self.running = False


def test_a_failed_swap_whose_old_model_fails_too_is_said_and_retried(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(agent_mod, "RESTART_RETRY_S", 0.001)
    old, new = SimpleNamespace(version="1"), SimpleNamespace(version="2")
    fails: list[Any] = [old, new]
    built: list[Runtime] = []

    def runtime(model: Any) -> Runtime:
        built.append(Runtime(model, fails))
        return built[-1]

    fake = SimpleNamespace(model=old, runtime=Runtime(old, []), _restarting=set())
    fake._runtime = runtime
    for name in ("_restart", "_restart_later", "_track"):
        setattr(fake, name, getattr(Agent, name).__get__(fake))

    async def run() -> None:
        with pytest.raises(LocalStateError, match="cannot start on"):
            await Agent.swap(fake, new)  # type: ignore[arg-type]
        assert fake.runtime.model is None and fake.runtime.running, built
        fails.remove(old)  # the old model can start again now
        for _ in range(1000):
            if fake.runtime.model is old:
                break
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.ERROR):
        asyncio.run(run())
    assert "NOTHING IS SCORED" in caplog.text, caplog.text
    assert fake.runtime.model is old and fake.runtime.running, built
    assert fake.model is old
