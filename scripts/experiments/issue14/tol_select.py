"""EXP14g selection, rounds 2 and 3 (training seed 0, injection seeds 1,2 only): tolerances.

    PYTHONPATH=. .venv/bin/python scripts/experiments/issue14/tol_select.py SEED [pooled] \
        > scripts/experiments/issue14/tol-sel[-pooled]-SEED.json

Like `trend_select.py` (one network, cached outputs; only the decision side is redone).
Variants: the per-sensor tolerances fitted at the 0.99 or 0.995 quantile of the normal
deviations instead of 0.95 (`tolerance_quantile`), for the level, spread and subspace kinds
(the code's form), or for the level kind only (`-level`, the others patched back to 0.95).
Choice, fixed before running: the variant with the larger mean of the injected overall F1
gains on the two backgrounds among those with unseen valve1 F1 >= base - 0.005 and every FAR
(valve1, both injected backgrounds) <= base + 1.0 point; none: no reporting run.

Round 3 (`pooled`): each sensor's tolerance is the quantile of its deviations pooled over all
held-out episodes' normal windows instead of the median over episodes of each one's quantile,
so a sensor that wanders far in some recordings gets the room it needs there and the common
threshold need not cover it for every sensor (0.95 and 0.99; level, spread and subspace
alike). Choice as in round 2, and only if its mean gain is at least +0.005; else no
reporting run.

Round 3 result: no variant qualified (pooled 0.95: injected FAR on valve1's background +1.6
points; pooled 0.99: unseen valve1 F1 -0.084). Round 4 (`pooled4`), rule as in round 3: the
pooled 0.95 tolerance for the level kind only (spread and subspace as before), or for the
level and subspace kinds (spread as before).
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

import cloud.model.pipeline as pipeline
import cloud.model.thresholds as thresholds
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
VARIANTS = {"base": 0.0, "q0.99": 0.99, "q0.995": 0.995, "q0.995-level": -0.995}
POOLED = len(sys.argv) > 2 and sys.argv[2] == "pooled"
if POOLED:
    VARIANTS = {"base": 0.0, "pooled-q0.95": 0.95, "pooled-q0.99": 0.99}
POOLED4 = len(sys.argv) > 2 and sys.argv[2] == "pooled4"
if POOLED4:
    VARIANTS = {"base": 0.0, "pooled-level": 0.95, "pooled-level-subspace": 0.95}
# which `_tolerance` calls (1 level, 2 spread, 0 subspace: their order in `with_tolerance`)
POOL_CALLS = {"pooled-level": {1}, "pooled-level-subspace": {1, 0}}

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


LEVEL_ONLY = [False]
_tolerance = thresholds._tolerance


def patched_tolerance(parts, quantile):  # type: ignore[no-untyped-def]
    """With LEVEL_ONLY the first call (the level's) keeps `quantile`, the others get 0.95."""
    calls[0] += 1
    if LEVEL_ONLY[0] and calls[0] % 3 != 1:
        quantile = 0.95
    if POOL[0] and (POOL[1] is None or calls[0] % 3 in POOL[1]):
        # the code without `tolerance_quantile` passes the budget (0.05), with it a quantile
        q = 1.0 - quantile if quantile < 0.5 else quantile
        pooled = np.quantile(np.abs(np.concatenate(parts)), q, axis=0)
        return np.maximum(1.0, pooled)
    return _tolerance(parts, quantile)


calls = [0]
POOL: list[object] = [False, None]
pipeline.train_net = cached_train_net  # type: ignore[assignment]
scoring.window_outputs = cached_window_outputs  # type: ignore[assignment]
thresholds._tolerance = patched_tolerance  # type: ignore[assignment]


def summary(c: Counts) -> dict[str, float]:
    return {"f1": round(c.f1, 4), "far": round(c.far, 4), "mar": round(c.mar, 4)}


def main() -> None:
    seed = int(sys.argv[1])
    unseen = DATA / "valve1"
    key = ed25519.Ed25519PrivateKey.generate()
    report: dict[str, object] = {}
    for name, q in VARIANTS.items():
        LEVEL_ONLY[0] = q < 0
        POOL[0] = (POOLED or POOLED4) and q > 0
        POOL[1] = POOL_CALLS.get(name) if POOLED4 else None
        calls[0] = 0
        options = TrainOptions(
            name="unseen-protocol",
            version="1",
            calibration_rows=400,
            train=TrainParams(seed=seed, threads=1),
            decision=(
                DecisionParams()  # rounds 3-4: the patch pools at 1 - target_far = 0.95
                if POOLED4
                else replace(DecisionParams(), tolerance_quantile=abs(q))  # commit e73037f
            ),
        )
        with tempfile.TemporaryDirectory(prefix="tol-sel-") as tmp:
            bundle = Path(tmp) / "bundle"
            train_without([DATA], unseen, bundle, options, key)
            _, total = unseen_kind(bundle, unseen, key.public_key(), 400)
            entry: dict[str, object] = {"valve1": summary(total)}
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
                    entry[bg] = summary(overall) | {
                        r.kind: round(r.counts.f1, 3) for r in results if r.kind != "none"
                    }
                entry["decision"] = {
                    k: v
                    for k, v in loaded.manifest.decision.model_dump().items()
                    if "threshold" in k or k.endswith("_tolerance") or k == "alert_windows"
                }
        report[name] = entry
        print(name, json.dumps(entry), file=sys.stderr, flush=True)
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
