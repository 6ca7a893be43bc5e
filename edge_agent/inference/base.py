"""The interface every inference backend implements, and how one is chosen."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from edge_agent.bundle import Manifest
from edge_agent.errors import InvalidInput
from edge_agent.windowing import FloatArray

Outputs = tuple[FloatArray, FloatArray, FloatArray]


class InferenceBackend(ABC):
    """Runs one model variant: windows [B, T, N] and masks in, the network's outputs out."""

    name: str = "base"

    @abstractmethod
    def run(self, window: FloatArray, mask: FloatArray) -> Outputs:
        """fault_prob [B], residual [B, N], contribution [B, N]."""

    def close(self) -> None:  # noqa: B027 - optional hook; most runtimes free on GC
        """Release the runtime's resources."""


def open_backend(
    kind: str, bundle_dir: Path, manifest: Manifest, variant: str, threads: int = 0
) -> InferenceBackend:
    """Open `variant` of a verified bundle with backend `kind` (onnxruntime or tensorrt)."""
    chosen = manifest.variant(variant)
    path = bundle_dir / chosen.file
    if kind == "onnxruntime":
        if chosen.format != "onnx":
            raise InvalidInput(f"variant {variant!r} is {chosen.format}, onnxruntime needs onnx")
        from edge_agent.inference.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, threads=threads)
    if kind == "tensorrt":
        from edge_agent.inference.tensorrt import TensorRtBackend

        return TensorRtBackend(path)
    raise InvalidInput(f"unknown inference backend {kind!r}; use onnxruntime or tensorrt")
