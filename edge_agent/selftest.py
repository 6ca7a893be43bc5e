"""The device self-test: a runnable variant must reproduce the bundle's golden outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_agent.bundle import Manifest, Variant
from edge_agent.errors import FailedPrecondition, IntegrityError
from edge_agent.inference.base import InferenceBackend, open_backend


def check_golden(
    directory: Path, manifest: Manifest, variant: Variant, backend: InferenceBackend
) -> str:
    """Runs the golden inputs through `backend`; IntegrityError when they do not reproduce."""
    with np.load(directory / manifest.golden.file) as golden:
        window, mask = golden["window"], golden["mask"]
        expected = (golden["fault_prob"], golden["residual"], golden["contribution"])
    tolerance = variant.metrics.get("golden_tolerance", manifest.golden.tolerance)
    actual = backend.run(window, mask)
    # Relative to magnitude: residuals are squared errors and can be large.
    diff = max(
        float((np.abs(a - e) / (1.0 + np.abs(e))).max())
        for a, e in zip(actual, expected, strict=True)
    )
    if not np.isfinite(diff) or diff > tolerance:
        raise IntegrityError(
            f"{directory}: variant {variant.name} fails the self-test: golden difference "
            f"{diff:.3g} (|a-e|/(1+|e|)) > tolerance {tolerance:g}"
        )
    return f"{diff:.2e} (tolerance {tolerance:g})"


def run_self_test(directory: Path, manifest: Manifest) -> dict[str, str]:
    """Largest relative difference per variant, or why it was skipped.

    Raises IntegrityError when a variant does not reproduce the golden outputs."""
    results: dict[str, str] = {}
    for variant in manifest.variants:
        kind = "onnxruntime" if variant.format == "onnx" else "tensorrt"
        try:
            backend = open_backend(kind, directory, manifest, variant.name)
        except FailedPrecondition as exc:
            results[variant.name] = f"skipped ({exc.message.split(';')[0]})"
            continue
        try:
            results[variant.name] = check_golden(directory, manifest, variant, backend)
        finally:
            backend.close()
    return results
