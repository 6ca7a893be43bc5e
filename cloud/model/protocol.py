"""The selection protocol for every modelling decision: fault kinds the model never saw.

- *Unseen kind*: train with one fault kind's files reduced to their calibration rows, without
  labels (what a site of an unlabelled kind offers), then score those files completely under
  the SKAB protocol.
- *Injected faults*: faults of several kinds (`cloud.model.faults`) written into real normal
  stretches at random times, scored per kind, on seeds the choice never saw.
- *Other sites under labels* (`other_sites_far`): train as `model train` does, with every
  label, then count false alarms on the normal rows of sites of the other kinds, calibrated on
  several stretch lengths. The unseen-kind training has (nearly) no labels, so it cannot see
  what a head trained on one kind's labels does at sites of other kinds.

`scripts/evaluate_unseen.py` runs all three; the test suite runs a small version.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.model.backtest import LoadedModel, evaluate, load_model
from cloud.model.data import list_data_files, read_header, read_table
from cloud.model.faults import KINDS, Stretch, inject
from cloud.model.metrics import Counts
from cloud.model.pipeline import TrainOptions, train_bundle
from edge_agent.scoring import calibrate_and_score, row_scores
from edge_agent.trust import Verifier
from edge_agent.windowing import align_to_grid


@dataclass(frozen=True)
class KindResult:
    kind: str
    counts: Counts
    runs: int


def normal_stretches(
    files: Iterable[Path],
    sensors: Sequence[str],
    calibration_rows: int,
    scored_rows: int,
    label_column: str = "anomaly",
    min_scored: int = 100,
) -> list[Stretch]:
    """Normal stretches of `calibration_rows + scored_rows` rows (shorter ones down to
    `min_scored` scored rows): an unlabelled file is cut into pieces; a labelled file gives
    the rows before its first labelled fault."""
    out = []
    for path in files:
        values, end = _rows_before_fault(path, sensors, label_column)
        span = calibration_rows + scored_rows
        for start in range(0, max(1, end - calibration_rows - min_scored + 1), span):
            stop = min(end, start + span)
            if stop - start - calibration_rows >= min_scored:
                out.append(
                    Stretch(f"{path.name}[{start}:{stop}]", values[start:stop], calibration_rows)
                )
    return out


def score_injected(
    loaded: LoadedModel,
    stretches: Sequence[Stretch],
    seeds: Sequence[int],
    kinds: Sequence[str] = ("none", *KINDS),
) -> list[KindResult]:
    """Counts per kind over every stretch and seed (rows after each calibration stretch)."""
    manifest = loaded.manifest
    sensors = tuple(s.name for s in manifest.sensors)
    period = manifest.sampling.period_s
    results = []
    for kind in kinds:
        total = Counts()
        runs = 0
        for seed in seeds:
            for n, stretch in enumerate(stretches):
                rng = np.random.default_rng([seed, n, [*KINDS, "none"].index(kind)])
                faulty = inject(stretch, kind, sensors, rng)
                times = np.arange(faulty.values.shape[0], dtype=np.float64) * period
                series = align_to_grid(
                    times, faulty.values, period, manifest.sampling.max_staleness_s
                )
                k = stretch.calibration_rows
                slots = calibrate_and_score(
                    loaded.model, loaded.frame, series, int(series.row_slot[k])
                )
                _, flags = row_scores(slots, series.row_slot, k)
                total = total + Counts.of(np.asarray(flags, dtype=bool), faulty.labels[k:])
                runs += 1
        results.append(KindResult(kind, total, runs))
    return results


def prefix_stretches(
    files: Iterable[Path],
    sensors: Sequence[str],
    calibration_rows: Sequence[int],
    label_column: str = "anomaly",
    min_scored: int = 50,
) -> list[Stretch]:
    """Each file's rows before its first labelled fault (all of them without one), once per
    calibration length in `calibration_rows`: calibrated on the first K rows, scored on the
    rest (at least `min_scored` rows, else that K is skipped for the file). Named
    `folder/file[0:end]@K`: files of one name in several folders stay apart."""
    out = []
    for path in files:
        values, end = _rows_before_fault(path, sensors, label_column)
        for k in calibration_rows:
            if end - k >= min_scored:
                out.append(Stretch(f"{site_name(path)}[0:{end}]@{k}", values[:end], k))
    return out


def site_name(path: Path) -> str:
    """`folder/file`: what `prefix_stretches` names a file's stretches after."""
    return f"{path.parent.name}/{path.name}"


def _rows_before_fault(
    path: Path, sensors: Sequence[str], label_column: str
) -> tuple[np.ndarray, int]:
    """A file's sensor values and the row its first labelled fault starts at (its length
    where it has no label column or no fault)."""
    names, _ = read_header(path)
    label = label_column if label_column in names else None
    table = read_table(path, list(sensors), None, label)
    end = table.rows
    if table.labels is not None and (table.labels > 0.5).any():
        end = int(np.argmax(table.labels > 0.5))
    return table.values, end


def other_sites_far(loaded: LoadedModel, stretches: Sequence[Stretch]) -> list[tuple[str, Counts]]:
    """Per stretch (`prefix_stretches`, `normal_stretches`): the counts of its scored rows,
    all normal, so every flag is a false alarm."""
    return [
        (stretch.name, score_injected(loaded, [stretch], [0], kinds=("none",))[0].counts)
        for stretch in stretches
    ]


def train_without(
    data: Sequence[Path],
    unseen: Path,
    out: Path,
    options: TrainOptions,
    key: ed25519.Ed25519PrivateKey,
) -> None:
    """Train on `data` with the files under `unseen` as unlabelled calibration context only."""
    train_bundle(data, out, replace(options, context_only=(unseen,)), key, log=lambda _: None)


def unseen_kind(
    bundle: Path,
    unseen: Path,
    key: Verifier,
    calibration_rows: int,
) -> tuple[list[tuple[str, Counts]], Counts]:
    """SKAB-protocol counts per file of the unseen kind, and their sum."""
    with load_model(bundle, key) as loaded:
        results, total = evaluate(loaded, unseen, calibration_rows)
    return [(r.path, r.counts) for r in results], total


def data_files(roots: Sequence[Path]) -> list[Path]:
    return [f for root in roots for f in list_data_files(root)]
