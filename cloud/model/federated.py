"""Federated fine-tuning: sites train on their own captured windows and send weight deltas.

For plants that may not export raw sensor data. At the site (a gateway holding the site's own
`autoglm data export`, which never leaves it), `model train-local` fine-tunes the base bundle's
network exactly as `model train --from-export` does (`cloud.model.finetune.tune_on_export`)
and writes an update file (`.npz`) holding only: the base's name, version and checkpoint
digest; per network parameter the delta new - base (float32, the parameter's shape); the
number of training windows (the FedAvg weight); and the site's decision fit in numbers (the
per-sensor tolerances it proposes, its groups' scores before and after). No window, reading,
timestamp or calibration is in it.

In the cloud, `model federate` checks every update was made from this base (digest, shapes),
adds the training-window-weighted mean of the deltas to the base (FedAvg, one round) and
takes, per sensor and kind, the largest tolerance any site proposed: conservative, since a
tolerance one site needs to quiet its false alarms is kept even where another site's faults
would have scored higher without it (each site checked its own faults against its own
proposal, with its own locally tuned network, not the averaged one). The result is a signed
bundle like `finetune_bundle` writes; its golden vectors come from the base's golden inputs,
since no raw window reaches the cloud; `training.federated` names the updates, their weights
and the tolerances chosen.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud import __version__
from cloud.model.bundle_writer import read_own_bundle
from cloud.model.decision_fit import TOLERANCE_KINDS
from cloud.model.finetune import FinetuneOptions, tune_on_export, write_tuned_bundle
from cloud.model.pipeline import CHECKPOINT, GOLDEN, load_checkpoint
from edge_agent.bundle import Manifest, sha256_file, verify_bundle
from edge_agent.errors import AlreadyExists, InvalidInput
from edge_agent.scoring import frame_of
from edge_agent.trust import Verifier
from edge_agent.windowing import FloatArray

UPDATE_FORMAT = 1
DELTA = "delta/"  # npz key prefix of a parameter's delta
TOLERANCE = "tolerance/"  # npz key prefix of a proposed tolerance kind ([N])
META = "meta"  # npz key of the JSON metadata (a 0-d string array)
META_KEYS = frozenset(
    {"format", "base", "sensors", "training_windows", "fault_windows", "epochs",
     "learning_rate", "seed", "decision", "trainer_version"}
)  # fmt: skip


@dataclass(frozen=True)
class SiteUpdate:
    """One site's contribution to a federated round (what its update file holds)."""

    base_name: str
    base_version: str
    base_digest: str  # sha256 of the base bundle's checkpoint
    sensors: tuple[str, ...]
    training_windows: int  # the FedAvg weight (judged windows counted as repeated)
    fault_windows: int
    epochs: int
    learning_rate: float
    seed: int
    delta: dict[str, FloatArray]  # parameter name -> new - base
    tolerance: dict[str, FloatArray]  # kind -> [N] per-sensor tolerance the site proposes
    decision: dict[str, object]  # the site's fit: group scores before/after, counts, note

    def meta(self) -> dict[str, object]:
        return {
            "format": UPDATE_FORMAT,
            "base": {
                "name": self.base_name,
                "version": self.base_version,
                "checkpoint_sha256": self.base_digest,
            },
            "sensors": list(self.sensors),
            "training_windows": self.training_windows,
            "fault_windows": self.fault_windows,
            "epochs": self.epochs,
            "learning_rate": self.learning_rate,
            "seed": self.seed,
            "decision": self.decision,
            "trainer_version": __version__,
        }


def write_update(path: Path, update: SiteUpdate) -> None:
    """The update file: deltas and tolerances as arrays, the rest as JSON under META."""
    if path.exists():
        raise AlreadyExists(f"{path}: exists; pick a new update file")
    arrays: dict[str, np.ndarray] = {DELTA + k: v for k, v in update.delta.items()}
    arrays |= {TOLERANCE + k: v for k, v in update.tolerance.items()}
    arrays[META] = np.asarray(json.dumps(update.meta(), sort_keys=True))
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    partial.rename(path)


def read_update(path: Path) -> SiteUpdate:
    """Reads an update file (no pickles); a file that is not one is an error naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{path}: not a readable update file: {exc}") from None
    if META not in arrays:
        raise InvalidInput(f"{path}: no {META!r}; `autoglm model train-local` writes update files")
    try:
        meta = json.loads(str(arrays.pop(META)))
        base = meta["base"]
        if meta["format"] != UPDATE_FORMAT:
            raise InvalidInput(
                f"{path}: update format {meta['format']}, this reads {UPDATE_FORMAT}"
            )
        return SiteUpdate(
            base_name=str(base["name"]),
            base_version=str(base["version"]),
            base_digest=str(base["checkpoint_sha256"]),
            sensors=tuple(meta["sensors"]),
            training_windows=int(meta["training_windows"]),
            fault_windows=int(meta["fault_windows"]),
            epochs=int(meta["epochs"]),
            learning_rate=float(meta["learning_rate"]),
            seed=int(meta["seed"]),
            delta={k[len(DELTA) :]: v for k, v in arrays.items() if k.startswith(DELTA)},
            tolerance={
                k[len(TOLERANCE) :]: v for k, v in arrays.items() if k.startswith(TOLERANCE)
            },
            decision=dict(meta["decision"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"{path}: malformed update metadata: {exc!r}") from None


def train_local(
    export_dir: Path,
    base_dir: Path,
    out: Path,
    options: FinetuneOptions,
    trusted: Verifier,
    log: Callable[[str], None] = print,
) -> SiteUpdate:
    """`model train-local`: fine-tune the base (signed by one of `trusted`) on the site's
    export as `model train --from-export` does, and write the update file `out`."""
    if out.exists():
        raise AlreadyExists(f"{out}: exists; pick a new update file")
    base = verify_bundle(base_dir, trusted)
    start = load_checkpoint(base_dir).state_dict()
    tuned = tune_on_export(export_dir, base_dir, base, options, log)
    n = len(base.sensors)
    fit = tuned.fit
    update = SiteUpdate(
        base_name=base.name,
        base_version=base.version,
        base_digest=sha256_file(base_dir / CHECKPOINT),
        sensors=tuple(s.name for s in base.sensors),
        training_windows=tuned.report.windows,
        fault_windows=int((tuned.windows.label > 0).sum()),
        epochs=tuned.report.epochs,
        learning_rate=options.learning_rate,
        seed=options.seed,
        delta={
            name: (value.detach().float() - start[name].float()).numpy().astype(np.float32)
            for name, value in tuned.net.state_dict().items()
        },
        tolerance={
            kind: np.asarray(getattr(fit.decision, f"{kind}_tolerance") or (1.0,) * n, np.float32)
            for kind in TOLERANCE_KINDS
        },
        decision={
            "base_model": {k: v.as_dict() for k, v in tuned.base_scores.items()},
            "before": {k: v.as_dict() for k, v in fit.before.items()},
            "after": {k: v.as_dict() for k, v in fit.after.items()},
            "false_alarms_left": fit.false_alarms_left,
            "faults_missed_before": fit.faults_missed_before,
            "windows_without_calibration": tuned.uncalibrated,
            "note": fit.note,
        },
    )
    write_update(out, update)
    return update


def check_update(path: Path, update: SiteUpdate, base: Manifest, digest: str,
                 shapes: dict[str, tuple[int, ...]]) -> None:  # fmt: skip
    """An update made from another base, or of other shapes, is refused by name."""
    if update.base_digest != digest:
        raise InvalidInput(
            f"{path}: made from {update.base_name}:{update.base_version} (checkpoint "
            f"{update.base_digest[:12]}), not from the base {base.name}:{base.version} "
            f"(checkpoint {digest[:12]}); train it again on this base"
        )
    if set(update.delta) != set(shapes):
        missing = sorted(set(shapes) - set(update.delta))
        extra = sorted(set(update.delta) - set(shapes))
        raise InvalidInput(
            f"{path}: parameters differ from the base's: missing {missing}, extra {extra}"
        )
    for name, shape in shapes.items():
        got = update.delta[name]
        if got.shape != shape or got.dtype != np.float32 or not np.isfinite(got).all():
            raise InvalidInput(
                f"{path}: delta of {name!r} is {got.dtype}{list(got.shape)}, the base's "
                f"parameter is float32{list(shape)} (finite values)"
            )
    n = len(base.sensors)
    for kind in TOLERANCE_KINDS:
        if kind == "subspace" and kind not in update.tolerance:
            continue  # an update from before the kind: the base's (`federate`)
        tol = update.tolerance.get(kind)
        if tol is None or tol.shape != (n,) or not (np.isfinite(tol) & (tol > 0)).all():
            raise InvalidInput(f"{path}: no positive {kind} tolerance per sensor ({n} sensors)")
    if update.training_windows < 1:
        raise InvalidInput(f"{path}: trained on {update.training_windows} windows")


def federate(
    base_dir: Path,
    update_files: Sequence[Path],
    out: Path,
    version: str,
    key: ed25519.Ed25519PrivateKey,
    trusted: Verifier | None = None,
) -> Manifest:
    """`model federate`: one FedAvg round over the sites' updates, written as a signed bundle
    (module docstring)."""
    if not update_files:
        raise InvalidInput("give at least one --update file")
    if out.exists():
        raise AlreadyExists(f"{out}: exists; pick a new bundle directory")
    wall = time.monotonic()
    base = read_own_bundle(base_dir, key, trusted)
    digest = sha256_file(base_dir / CHECKPOINT)
    net = load_checkpoint(base_dir)
    state = net.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    updates = [read_update(p) for p in update_files]
    for path, update in zip(update_files, updates, strict=True):
        check_update(path, update, base, digest, shapes)
    weights = np.asarray([u.training_windows for u in updates], dtype=np.float64)
    share = weights / weights.sum()
    averaged = fedavg(state, [u.delta for u in updates], share)
    net.load_state_dict(averaged)
    net.eval()
    decision = frame_of(base).decision
    # An update from before the subspace kind proposes the base's subspace tolerance.
    kept = np.asarray(decision.subspace_tolerance or (1.0,) * len(base.sensors), np.float32)
    tolerance = {
        kind: np.max([u.tolerance.get(kind, kept) for u in updates], axis=0)
        for kind in TOLERANCE_KINDS
    }
    decision = dataclasses.replace(
        decision,
        level_tolerance=_tolerance(tolerance["level"], decision.level_tolerance),
        spread_tolerance=_tolerance(tolerance["spread"], decision.spread_tolerance),
        residual_tolerance=_tolerance(tolerance["residual"], decision.residual_tolerance),
        subspace_tolerance=_tolerance(tolerance["subspace"], decision.subspace_tolerance),
    )
    with np.load(base_dir / GOLDEN) as golden:
        golden_inputs = (golden["window"], golden["mask"])
    training = {
        "fine_tuned_from": f"{base.name}:{base.version}",
        "federated": {
            "rounds": 1,
            "rule": "FedAvg: base + training-window-weighted mean of the sites' deltas; per "
            "sensor and kind the largest tolerance any site proposed (conservative)",
            "updates": [
                {
                    "file": p.name,
                    "sha256": sha256_file(p),
                    "training_windows": u.training_windows,
                    "fault_windows": u.fault_windows,
                    "weight": round(float(s), 6),
                    "epochs": u.epochs,
                    "tolerance": {
                        k: [round(float(x), 4) for x in v] for k, v in u.tolerance.items()
                    },
                    "decision": u.decision,
                }
                for p, u, s in zip(update_files, updates, share, strict=True)
            ],
            "tolerance": {k: [round(float(x), 4) for x in v] for k, v in tolerance.items()},
        },
        "training_windows": int(weights.sum()),
        "labelled_fault_windows": sum(u.fault_windows for u in updates),
        "wall_seconds": round(time.monotonic() - wall, 1),
        "trainer_version": __version__,
    }
    return write_tuned_bundle(net, base, out, golden_inputs, decision, version, training, key)


def _tolerance(chosen: FloatArray, base: tuple[float, ...]) -> tuple[float, ...]:
    """The chosen per-sensor tolerances; the base's own (possibly empty: 1.0 each) where no
    site raised any."""
    values = tuple(round(float(x), 4) for x in chosen)
    return base if values == (base or (1.0,) * len(values)) else values


def fedavg(
    state: dict[str, torch.Tensor], deltas: Sequence[dict[str, FloatArray]], share: FloatArray
) -> dict[str, torch.Tensor]:
    """The base's parameters plus the `share`-weighted mean of the deltas (shares sum to 1)."""
    out = {}
    for name, value in state.items():
        mean = np.zeros(value.shape, dtype=np.float64)
        for s, delta in zip(share, deltas, strict=True):
            mean += float(s) * delta[name].astype(np.float64)
        out[name] = value + torch.from_numpy(mean).to(value.dtype)
    return out
