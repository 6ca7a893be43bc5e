"""Captured windows for tests: what an agent would capture, and its record on the wire."""

from __future__ import annotations

import numpy as np

from edge_agent.calibration import SiteCalibration
from edge_agent.capture import ALERT, CapturedWindow
from edge_agent.wire import capture_record
from protos.autoglm.v1 import agent_pb2

T0 = 1_790_000_000.25


def site_calibration(n: int, seed: int = 0) -> SiteCalibration:
    """A site calibration of N sensors as an agent fits one (levels included; a subspace of
    k = 2 directions where N >= 4, as `fit_subspace` gives none below)."""
    rng = np.random.default_rng(seed + 1000)
    corr = np.eye(n) + 0.2 * (np.ones((n, n)) - np.eye(n))
    basis = np.linalg.qr(rng.normal(size=(n, 2)))[0].astype(np.float32) if n >= 4 else None
    return SiteCalibration(
        input_center=np.arange(n, dtype=np.float32),
        input_scale=np.full(n, 0.25, dtype=np.float32),
        residual_scale=rng.uniform(0.5, 1.5, n).astype(np.float32),
        rows=120,
        level_center=np.arange(n, dtype=np.float32) + 0.1,
        level_scale=rng.uniform(0.25, 1.0, n).astype(np.float32),
        level_precision=np.linalg.inv(corr).astype(np.float32),
        spread_center=rng.uniform(0.1, 0.5, n).astype(np.float32),
        subspace_center=None if basis is None else np.arange(n, dtype=np.float32) + 0.2,
        subspace_basis=basis,
        subspace_scale=None if basis is None else rng.uniform(0.25, 1.0, n).astype(np.float32),
    )


def window(
    t: int = 24,
    n: int = 4,
    reason: str = ALERT,
    seed: int = 0,
    key: str = "pump-1-1",
    calibrated: bool = True,
) -> CapturedWindow:
    """A window with some readings missing (their stale ring values are 123, never sent);
    `calibrated` False: as an agent from before captures carried the whole calibration."""
    rng = np.random.default_rng(seed)
    values = rng.normal(10, 1, (t, n)).astype(np.float32)
    mask = (rng.random((t, n)) > 0.1).astype(np.float32)
    values[~(mask > 0)] = 123.0
    return CapturedWindow(
        reason=reason,
        asset="pump-1",
        model_version="7",
        alert_key=key if reason == ALERT else "",
        score=2.5 if reason == ALERT else 0.4,
        window_start=T0,
        period_s=0.5,
        sensors=tuple(f"s{j}" for j in range(n)),
        values=values,
        mask=mask,
        input_center=np.arange(n, dtype=np.float32),
        input_scale=np.full(n, 0.25, dtype=np.float32),
        calibration=site_calibration(n, seed) if calibrated else None,
    )


def capture_proto(sequence: int, captured: CapturedWindow | None = None) -> agent_pb2.Record:
    """The synced record of a capture, numbered."""
    record = agent_pb2.Record()
    record.ParseFromString(capture_record(captured or window(seed=sequence)))
    record.sequence = sequence
    return record
