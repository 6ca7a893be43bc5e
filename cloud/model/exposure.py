"""Fault exposure: the fault head also learns from faults written into the training's normal data.

The head learns what its labels show. Trained on one kind's labels, it learns that kind's
signature and stays quiet elsewhere; a head that saw several kinds of departure from normal
generalises further (EXP14k: trained on the 296 labelled rows of one SKAB file of another
kind, it lifted unseen valve1's F1 from 0.756 to 0.814). Exposure gives every training such
labels, also where nobody labelled anything: each normal episode gets `copies` copies, each
with one fault of the physically plausible kinds of `cloud.model.faults` after its
calibration rows, labelled; the copy ends where its fault ends, so no window after a fault
teaches the forecast that a fault's aftermath is normal (windows ending inside a fault never
enter the forecast loss). Thresholds are still fitted on held-out normal data only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cloud.model.dataset import Episode
from cloud.model.faults import KINDS, Stretch, inject
from edge_agent.errors import InvalidInput
from edge_agent.windowing import AlignedSeries

MIN_SCORED_WINDOWS = 1  # a copy needs room for a fault at least this many windows long


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
            stop = int(np.flatnonzero(faulty.labels)[-1]) + 1 if faulty.labels.any() else 0
            if stop <= window:
                continue
            mask = episode.series.mask[:stop] * np.isfinite(faulty.values[:stop])
            series = AlignedSeries(
                start=episode.series.start,
                period_s=episode.series.period_s,
                values=np.nan_to_num(faulty.values[:stop]).astype(np.float32),
                mask=mask.astype(np.float32),
                row_slot=np.arange(stop, dtype=np.int64),
            )
            labels = faulty.labels[:stop].astype(np.float32)
            out.append(Episode(f"{episode.name}+{kind}", series, labels))
    return out
