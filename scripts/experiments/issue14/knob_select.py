"""EXP14i selection (training seed 0, injection seeds 1,2 only): decision knobs never swept.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python scripts/experiments/issue14/knob_select.py 0 \
        scripts/experiments/issue14/knob-sel-0.json

Like `tol_select.py` / `away_select.py` (one network, cached outputs; only the decision side is
redone). Each variant is a `DecisionParams` change passed to training as `options.decision`, so
the training pipeline itself re-fits the thresholds, the tolerances and the alert debounce for
the same false-alarm budget with the variant in place (`fit_thresholds` smooths with
`base.smoothing`, combines with `base.alone`, and the held-out evidence is computed with the
variant's `level_window`): every variant is compared at its fitted budget, not at fixed
thresholds. All three knobs are plain `DecisionParams` fields, fixed (not fitted) by training;
no product code is patched besides the caches.

Variants (one change from the defaults each; defaults then level_window 30, smoothing 5 (1 since
EXP14j: a rerun's `base` is its smoothing-1 variant), alone 1.15
with combine `top2`): level_window 15, 20, 45, 60; smoothing 1, 3, 8; alone 1.0 (with `top2`
this is the `max` rule: one kind alone at its threshold raises the score), 1.3. Then one
combination: for each knob, its best variant is the one with the largest unseen valve1 F1 among
those meeting the constraints below (else among all of its variants); the combination joins the
best variants of the two knobs whose best variants have the largest unseen valve1 F1.

Choice rule, fixed before running: a variant qualifies iff, against `base` (same seed),
  1. unseen valve1 F1 gain >= +0.020 (3 decimals);
  2. unseen valve1 FAR rises by no more than 1.0 point (0.1-point precision);
  3. injected all-kinds FAR rises by no more than 1.0 point on either background (valve1's,
     the unlabelled files');
  4. injected all-kinds ("overall") F1 falls by no more than 0.005 on either background.
The chosen variant is the qualifying one with the largest unseen valve1 F1 gain; none
qualifying: none is chosen. Selection only: a chosen variant is a candidate for a future
pre-registered reporting test on fresh seeds, never adopted from these figures.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

import cloud.model.pipeline as pipeline
import edge_agent.calibration as calibration
import edge_agent.scoring as scoring
from cloud.model.backtest import load_model
from cloud.model.data import list_data_files, read_header
from cloud.model.metrics import Counts
from cloud.model.pipeline import TrainOptions
from cloud.model.protocol import normal_stretches, score_injected, train_without, unseen_kind
from cloud.model.train import TrainParams
from edge_agent.calibration import DecisionParams

DATA = Path("/work/shared/datasets/skab")
SEEDS = [1, 2]
# name -> (knob, value); interleaved so a run cut short still covers every knob
VARIANTS: dict[str, tuple[str, float] | None] = {
    "base": None,
    "smoothing-3": ("smoothing", 3),
    "level_window-20": ("level_window", 20),
    "alone-1.3": ("alone", 1.3),
    "level_window-45": ("level_window", 45),
    "smoothing-8": ("smoothing", 8),
    "alone-1.0": ("alone", 1.0),
    "level_window-15": ("level_window", 15),
    "level_window-60": ("level_window", 60),
    "smoothing-1": ("smoothing", 1),
}

_trained: dict[tuple[object, ...], tuple[dict[str, object], object]] = {}
_train_net = pipeline.train_net


def cached_train_net(net, windows, params, bar):  # type: ignore[no-untyped-def]
    key = (windows.z.shape, float(np.nansum(windows.z[:50])), params.seed)
    if key not in _trained:
        report = _train_net(net, windows, params, bar)
        _trained[key] = (copy.deepcopy(net.state_dict()), report)
    state, report = _trained[key]
    net.load_state_dict(state)
    return report


_outputs: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
_prints: dict[int, tuple[object, str]] = {}


def _fingerprint(model: object, x: np.ndarray) -> str:
    entry = _prints.get(id(model))
    if entry is None or entry[0] is not model:
        probe = np.random.default_rng(7).normal(size=(2, *x.shape[1:])).astype(np.float32)
        p, r, c = model.run(probe, np.ones_like(probe))  # type: ignore[attr-defined]
        digest = hashlib.sha1(np.round(np.concatenate([p, r.ravel(), c.ravel()]), 4).tobytes())
        entry = (model, digest.hexdigest())
        _prints[id(model)] = entry
    return entry[1]


def cached_window_outputs(model, frame, x, m):  # type: ignore[no-untyped-def]
    key = (_fingerprint(model, x), hashlib.sha1(x.tobytes() + m.tobytes()).hexdigest())
    if key not in _outputs:
        _outputs[key] = model.run(x, m)
    return calibration.WindowOutputs(*_outputs[key], *scoring.window_statistics(frame, x, m))


pipeline.train_net = cached_train_net  # type: ignore[assignment]
scoring.window_outputs = cached_window_outputs  # type: ignore[assignment]


def summary(c: Counts) -> dict[str, float]:
    return {"f1": round(c.f1, 4), "far": round(c.far, 4), "mar": round(c.mar, 4)}


def run_variant(seed: int, changes: dict[str, float], key: ed25519.Ed25519PrivateKey) -> dict:
    unseen = DATA / "valve1"
    options = TrainOptions(
        name="unseen-protocol",
        version="1",
        calibration_rows=400,
        train=TrainParams(seed=seed, threads=1),
        decision=replace(DecisionParams(), **changes),  # type: ignore[arg-type]
    )
    with tempfile.TemporaryDirectory(prefix="knob-sel-") as tmp:
        bundle = Path(tmp) / "bundle"
        train_without([DATA], unseen, bundle, options, key)
        _, total = unseen_kind(bundle, unseen, key.public_key(), 400)
        entry: dict[str, object] = {"changes": changes, "valve1": summary(total)}
        with load_model(bundle, key.public_key(), threads=1) as loaded:
            sensors = [s.name for s in loaded.manifest.sensors]
            backgrounds = {
                "v1": normal_stretches(list_data_files(unseen), sensors, 400, 600),
                "unl": normal_stretches(
                    [
                        f
                        for f in list_data_files(DATA)
                        if unseen not in f.parents and "anomaly" not in read_header(f)[0]
                    ],
                    sensors,
                    400,
                    600,
                ),
            }
            for bg, stretches in backgrounds.items():
                results = score_injected(loaded, stretches, SEEDS)
                overall = sum((r.counts for r in results if r.kind != "none"), Counts())
                none = [r.counts.far for r in results if r.kind == "none"]
                entry[bg] = (
                    summary(overall)
                    | {r.kind: round(r.counts.f1, 3) for r in results if r.kind != "none"}
                    | {"none_far": round(none[0], 4) if none else None}
                )
            entry["decision"] = {
                k: v
                for k, v in loaded.manifest.decision.model_dump().items()
                if "threshold" in k
                or k.endswith("_tolerance")
                or k in ("alert_windows", "supervised", "smoothing", "level_window", "alone")
            }
    return entry


def verdict(entry: dict, base: dict) -> dict[str, object]:
    """The choice rule's four conditions against `base` (see the docstring)."""
    gain = round(entry["valve1"]["f1"] - base["valve1"]["f1"], 3)
    far_up = round(100 * (entry["valve1"]["far"] - base["valve1"]["far"]), 1)
    inj_far_up = {bg: round(100 * (entry[bg]["far"] - base[bg]["far"]), 1) for bg in ("v1", "unl")}
    inj_f1 = {bg: round(entry[bg]["f1"] - base[bg]["f1"], 3) for bg in ("v1", "unl")}
    constraints = (
        far_up <= 1.0
        and all(v <= 1.0 for v in inj_far_up.values())
        and all(v >= -0.005 for v in inj_f1.values())
    )
    return {
        "valve1_f1_gain": gain,
        "valve1_far_up_points": far_up,
        "injected_far_up_points": inj_far_up,
        "injected_f1_change": inj_f1,
        "constraints_met": constraints,
        "qualifies": constraints and gain >= 0.020,
    }


def main() -> None:
    seed = int(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    key = ed25519.Ed25519PrivateKey.generate()
    report: dict[str, dict] = {}

    def record(name: str, changes: dict[str, float]) -> None:
        start = time.monotonic()
        entry = run_variant(seed, changes, key)
        if name != "base":
            entry["rule"] = verdict(entry, report["base"])
        entry["seconds"] = round(time.monotonic() - start)
        report[name] = entry
        print(name, json.dumps(entry), file=sys.stderr, flush=True)
        if out is not None:
            out.write_text(json.dumps(report, indent=1) + "\n")

    for name, change in VARIANTS.items():
        record(name, {} if change is None else {change[0]: change[1]})

    # the combination of the two knobs whose best variants have the largest valve1 F1
    best: dict[str, str] = {}
    for knob in ("level_window", "smoothing", "alone"):
        names = [n for n, c in VARIANTS.items() if c is not None and c[0] == knob]
        met = [n for n in names if report[n]["rule"]["constraints_met"]] or names
        best[knob] = max(met, key=lambda n: report[n]["valve1"]["f1"])
    top = sorted(best.values(), key=lambda n: report[n]["valve1"]["f1"], reverse=True)[:2]
    combo: dict[str, float] = {}
    for n in top:
        combo |= report[n]["changes"]
    record("combo:" + "+".join(top), combo)

    qualifying = [n for n, e in report.items() if n != "base" and e["rule"]["qualifies"]]
    chosen = max(qualifying, key=lambda n: report[n]["rule"]["valve1_f1_gain"], default=None)
    report["choice"] = {"best_per_knob": best, "qualifying": qualifying, "chosen": chosen}
    text = json.dumps(report, indent=1) + "\n"
    if out is not None:
        out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
