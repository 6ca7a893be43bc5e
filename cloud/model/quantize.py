"""`model quantize`: INT8 (ONNX Runtime static QDQ) and FP16 variants, gated on F1.

The correlation adjacency and the graph propagation (the un-scoped MatMuls in the graph) stay
fp32: a Pearson coefficient near the threshold flips an edge on a rounding error. So does the
small fault head, whose probability is compared with a threshold near 1 (quantizing it cost
0.04 F1 on SKAB valve1), and so do the layers that see the window's values or produce the
forecast: the encoder and graph layer take normalised values up to the clamp (+-20), where an
INT8 step is coarse and a clipped range cannot forecast a sensor that sits far from its median,
and the `residual` output squares the decoder's error. The GRU and the attention (two thirds to
three quarters of the multiply-adds) are quantized, with asymmetric activation ranges (their
inputs are mostly ReLU outputs) taken at the 99.9th percentile of the calibration windows: the
few fault rows that reach the clamp otherwise stretch the ranges several-fold (`golden.npz`
differences of 0.4-0.5 with 8 segments, MinMax). A variant is kept only if its F1 under the
SKAB protocol on the calibration data falls no more than `max_drop` below fp32's (against the
labels where the files have them, else against fp32's own flags).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.model.backtest import LoadedModel, score_file
from cloud.model.bundle_writer import read_own_bundle, write_signed_manifest
from cloud.model.data import list_data_files, read_header, read_table
from cloud.model.metrics import Counts
from cloud.model.pipeline import FP32_ONNX, GOLDEN
from edge_agent.bundle import Manifest, Variant, sha256_file
from edge_agent.calibration import fit_input_normalisation, to_network_space
from edge_agent.errors import FailedPrecondition, IntegrityError, InvalidInput
from edge_agent.inference.onnxruntime import OnnxRuntimeBackend
from edge_agent.scoring import frame_of
from edge_agent.selftest import check_golden
from edge_agent.windowing import align_to_grid, windows_ending_at

MAX_CALIBRATION_WINDOWS = 512
KEEP_FP32_MODULES = ("classify", "encode", "graph", "decode")
CALIBRATION_PERCENTILE = 99.9
GOLDEN_TOLERANCE = {"fp16": 2e-2, "int8": 0.25}


@dataclass(frozen=True)
class GateResult:
    precision: str
    f1_reference: float
    f1_variant: float
    reference: str
    variant_counts: Counts
    accepted: bool
    fidelity: str = ""  # how far it is from the fp32 golden outputs, or why it fails them

    @property
    def drop(self) -> float:
        return self.f1_reference - self.f1_variant


def quantize_bundle(
    directory: Path,
    precision: str,
    calibration_data: Path,
    calibration_rows: int,
    max_drop: float,
    key: ed25519.Ed25519PrivateKey,
    label_column: str = "anomaly",
) -> GateResult:
    """Make the variant, gate it, and add it to the signed manifest if it passes."""
    if precision not in ("int8", "fp16"):
        raise InvalidInput(f"--precision {precision!r}: use int8 or fp16")
    manifest = read_own_bundle(directory, key)
    files = list_data_files(calibration_data)
    target = directory / f"model.{precision}.onnx"
    with tempfile.TemporaryDirectory(prefix="autoglm-quant-") as tmp:
        candidate = Path(tmp) / target.name
        if precision == "int8":
            _int8(directory / FP32_ONNX, candidate, manifest, files, calibration_rows)
        else:
            _fp16(directory / FP32_ONNX, candidate)
        result = _gate(
            directory,
            manifest,
            candidate,
            precision,
            files,
            calibration_rows,
            max_drop,
            label_column,
        )
        if not result.accepted:
            why = (
                f"F1 {result.f1_variant:.4f} vs fp32 {result.f1_reference:.4f} "
                f"({result.reference}), a drop of {result.drop:.4f} > --max-drop {max_drop}"
                if result.drop > max_drop
                else f"it does not reproduce the fp32 outputs ({result.fidelity})"
            )
            raise FailedPrecondition(f"{precision} variant refused: {why}; the bundle is unchanged")
        candidate.replace(target)
    variant = Variant(
        name=precision,
        file=target.name,
        format="onnx",
        precision=precision,  # type: ignore[arg-type]
        sha256=sha256_file(target),
        metrics={
            "f1": round(result.f1_variant, 4),
            "f1_fp32": round(result.f1_reference, 4),
            "far": round(result.variant_counts.far, 4),
            "mar": round(result.variant_counts.mar, 4),
            "golden_tolerance": GOLDEN_TOLERANCE[precision],
        },
    )
    variants = [v for v in manifest.variants if v.name != precision] + [variant]
    write_signed_manifest(directory, manifest.model_copy(update={"variants": variants}), key)
    return result


def _int8(
    source: Path, target: Path, manifest: Manifest, files: list[Path], calibration_rows: int
) -> None:
    quantize_int8(source, target, list(_calibration_windows(manifest, files, calibration_rows)))


def quantize_int8(source: Path, target: Path, batches: list[dict[str, np.ndarray]]) -> None:
    """The INT8 recipe: static QDQ from `batches` of network inputs, sensitive parts in fp32."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._items = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._items, None)

    model = onnx.load(str(source))
    keep_fp32 = [
        n.name
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm")
        and (n.name.count("/") <= 1 or n.name.split("/")[1] in KEEP_FP32_MODULES)
    ]
    # The percentile calibrator prints its progress; the CLI's stdout is its result.
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            str(source),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_exclude=keep_fp32,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"ActivationSymmetric": False, "CalibPercentile": CALIBRATION_PERCENTILE},
        )


def _fp16(source: Path, target: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    keep_fp32 = [n.name for n in model.graph.node if n.name.count("/") <= 1]
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep_fp32)
    onnx.save(converted, str(target))


def _calibration_windows(
    manifest: Manifest, files: list[Path], calibration_rows: int
) -> Iterator[dict[str, np.ndarray]]:
    """Windows as a device feeds them (site-calibrated), spread over the files, in batches."""
    frame = frame_of(manifest)
    sensors = [s.name for s in manifest.sensors]
    per_file = max(1, MAX_CALIBRATION_WINDOWS // len(files))
    rng = np.random.default_rng(0)
    for path in files:
        table = read_table(path, sensors)
        series = align_to_grid(
            table.times, table.values, manifest.sampling.period_s, manifest.sampling.max_staleness_s
        )
        cal = min(calibration_rows, series.slots // 2)
        center, scale = fit_input_normalisation(
            series.values[:cal], series.mask[:cal], frame.training_scale, frame.decision.scale_floor
        )
        ends = np.arange(frame.window - 1, series.slots, dtype=np.int64)
        if ends.size == 0:
            continue
        ends = rng.choice(ends, size=min(per_file, ends.size), replace=False)
        x, m = windows_ending_at(series, ends, frame.window)
        x = to_network_space(x, center, scale, frame.net_center, frame.net_scale)
        yield {"window": x, "mask": m}


def _gate(
    directory: Path,
    manifest: Manifest,
    candidate: Path,
    precision: str,
    files: list[Path],
    calibration_rows: int,
    max_drop: float,
    label_column: str,
) -> GateResult:
    frame = frame_of(manifest)
    reference = LoadedModel(directory, manifest, OnnxRuntimeBackend(directory / FP32_ONNX), frame)
    variant = LoadedModel(directory, manifest, OnnxRuntimeBackend(candidate), frame)
    ref_counts, var_counts = Counts(), Counts()
    labelled = all(label_column in read_header(p)[0] for p in files)
    for path in files:
        _, _, ref_flags = score_file(reference, path, calibration_rows)
        _, _, var_flags = score_file(variant, path, calibration_rows)
        if labelled:
            labels = read_table(path, [], None, label_column).labels
            assert labels is not None
            truth = labels[calibration_rows:] > 0.5
        else:
            truth = ref_flags
        ref_counts = ref_counts + Counts.of(ref_flags, truth)
        var_counts = var_counts + Counts.of(var_flags, truth)
    with np.load(directory / GOLDEN) as golden:
        out = OnnxRuntimeBackend(candidate).run(golden["window"], golden["mask"])
        if not np.isfinite(out[0]).all():
            raise FailedPrecondition(f"{precision} variant gives non-finite outputs")
    # The decision may hold its F1 on evidence that does not come from the network (levels,
    # spreads); the variant must still compute what the network computes, as the device's
    # self-test will demand.
    probe = Variant(
        name=precision,
        file=candidate.name,
        format="onnx",
        precision=precision,  # type: ignore[arg-type]
        sha256="",
        metrics={"golden_tolerance": GOLDEN_TOLERANCE[precision]},
    )
    try:
        fidelity = check_golden(directory, manifest, probe, OnnxRuntimeBackend(candidate))
        faithful = True
    except IntegrityError as exc:
        fidelity, faithful = str(exc).rsplit(": ", 1)[-1], False
    drop = ref_counts.f1 - var_counts.f1
    return GateResult(
        precision=precision,
        f1_reference=ref_counts.f1,
        f1_variant=var_counts.f1,
        reference="labels" if labelled else "fp32 flags",
        variant_counts=var_counts,
        accepted=drop <= max_drop and faithful,
        fidelity=fidelity,
    )
