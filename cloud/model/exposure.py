"""Fault exposure: the fault head also learns from faults written into the training's normal data.

The head learns what its labels show. Trained on one kind's labels, it learns that kind's
signature and stays quiet elsewhere; a head that saw several kinds of departure from normal
generalises further (EXP14k: trained on the 296 labelled rows of one SKAB file of another
kind, it lifted unseen valve1's F1 from 0.756 to 0.814). Exposure gives every training such
labels, also where nobody labelled anything: each normal episode gets `copies` copies, each
with one fault of the physically plausible kinds of `cloud.model.faults` after its
calibration rows, labelled where the fault shows (`visible_labels`). Thresholds are still
fitted on held-out normal data only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cloud.model.dataset import IGNORE, Episode
from cloud.model.faults import KINDS, Stretch, inject
from edge_agent.errors import InvalidInput
from edge_agent.windowing import AlignedSeries

MIN_SCORED_WINDOWS = 1  # a copy needs room for a fault at least this many windows long
VISIBLE_ROWS = 30  # rows over which an injected change must show (the default level window)
VISIBLE_SIGMA = 1.0  # RMS of the change there, in the sensor's calibration standard deviations


def visible_labels(
    before: np.ndarray,
    after: np.ndarray,
    fault: np.ndarray,
    calibration_rows: int,
    window: int,
) -> np.ndarray:
    """Slot labels of a copy: 1 where its fault has shown (the injected change's RMS over the
    last `VISIBLE_ROWS` rows reaches `VISIBLE_SIGMA` calibration standard deviations on some
    sensor); `IGNORE` on fault rows before that (a window no detector could tell from normal
    must not teach the head that normal-looking windows are faults) and for a window's length
    after the fault (windows still holding fault rows: the forecast must not learn them); 0
    elsewhere, before the fault and after it, so a copy's late windows are normal as often as
    its early ones (faults only at late rows taught the head "far from calibration = fault")."""
    sigma = np.nanstd(before[:calibration_rows], axis=0)
    sigma = np.where(np.isfinite(sigma) & (sigma > 0), sigma, 1e-3)
    change = np.nan_to_num((after - before) / sigma) ** 2
    sums = np.concatenate([np.zeros((1, change.shape[1])), np.cumsum(change, axis=0)])
    idx = np.arange(change.shape[0])
    lo = np.maximum(0, idx + 1 - VISIBLE_ROWS)
    rms = np.sqrt((sums[idx + 1] - sums[lo]) / (idx + 1 - lo)[:, None]).max(axis=1)
    labels = np.zeros(change.shape[0], dtype=np.float32)
    stop = int(np.flatnonzero(fault)[-1]) + 1
    labels[stop : stop + window - 1] = IGNORE
    labels[fault] = np.where(rms[fault] >= VISIBLE_SIGMA, 1.0, IGNORE)
    return labels


def exposed_episodes(
    episodes: Sequence[Episode],
    sensors: tuple[str, ...],
    calibration_rows: int,
    window: int,
    copies: int,
    seed: int,
    kinds: Sequence[str] = (),
) -> list[Episode]:
    """`copies` fault-injected copies of each episode without labelled faults, the kinds taken
    in turn from a seeded shuffle of `kinds` (empty: every kind); [] when `copies` is 0."""
    if copies <= 0:
        return []
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise InvalidInput(f"fault exposure: unknown kinds {unknown}; known: {sorted(KINDS)}")
    rng = np.random.default_rng([seed, 14])
    kinds = list(kinds or KINDS)
    order: list[str] = []
    out = []
    for episode in episodes:
        if np.nan_to_num(episode.labels).max(initial=0.0) > 0.5:
            continue  # a labelled fault: its own labels teach the head
        cal = min(calibration_rows, episode.series.slots // 2)
        if episode.series.slots - cal < window + MIN_SCORED_WINDOWS:
            continue
        for _ in range(copies):
            if not order:
                order = [kinds[i] for i in rng.permutation(len(kinds))]
            kind = order.pop()
            values = np.where(episode.series.mask > 0, episode.series.values, np.nan)
            faulty = inject(Stretch(episode.name, values, cal), kind, sensors, rng)
            if not faulty.labels.any():
                continue
            mask = episode.series.mask * np.isfinite(faulty.values)
            series = AlignedSeries(
                start=episode.series.start,
                period_s=episode.series.period_s,
                values=np.nan_to_num(faulty.values).astype(np.float32),
                mask=mask.astype(np.float32),
                row_slot=np.arange(faulty.values.shape[0], dtype=np.int64),
            )
            labels = visible_labels(values, faulty.values, faulty.labels, cal, window)
            out.append(Episode(f"{episode.name}+{kind}", series, labels))
    return out
