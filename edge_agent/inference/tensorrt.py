"""TensorRT backend through Polygraphy, imported lazily: only Jetson/GPU images have it.

Engines are built per device profile (`build_engine`), in the cloud where a matching GPU
exists, else on the device at first load; either way from the verified ONNX variant. What
Polygraphy and TensorRT raise (their own exception kinds) is mapped here, once: an engine that
does not deserialize is an `IntegrityError`, one that cannot be built a `FailedPrecondition`,
one that cannot be read from disk a `LocalStateError`, one that cannot be made ready to run
for lack of GPU memory a `GpuOutOfMemory` (a `LocalStateError`), and one that cannot be made
ready to run for any other reason (a missing plugin, code for another GPU) an
`IntegrityError`, all naming the file.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import FailedPrecondition, IntegrityError, LocalStateError
from edge_agent.inference.base import InferenceBackend, Outputs
from edge_agent.windowing import FloatArray

MISSING = (
    "TensorRT is not available here ({reason}); engines need an NVIDIA GPU with TensorRT and "
    "Polygraphy (JetPack on Jetson, or `pip install tensorrt polygraphy` on x86 with CUDA). "
    "The bundle stays marked build-on-device; the ONNX Runtime backend runs it meanwhile."
)


# How CUDA, TensorRT and Polygraphy say the GPU has no memory for what was asked:
# cudaErrorMemoryAllocation (CUDA error 2, "out of memory"), CUDA_ERROR_OUT_OF_MEMORY,
# TensorRT's "Error Code 2: OutOfMemory", Polygraphy's "CUDA Error: 2." from its CUDA wrapper.
_OUT_OF_MEMORY = re.compile(
    r"out of memory|outofmemory|cudaErrorMemoryAllocation|CUDA_ERROR_OUT_OF_MEMORY"
    r"|CUDA Error: 2\b",
    re.IGNORECASE,
)


class GpuOutOfMemory(LocalStateError):
    """The engine deserialized but the GPU has not the memory to run it now (beside what
    serves): this device's state, tried again a bounded number of times."""


def require_tensorrt() -> Any:
    """Polygraphy's TensorRT backend, or FailedPrecondition saying how to get it."""
    try:
        import tensorrt  # noqa: F401 - Polygraphy's trt backend needs it at call time
        from polygraphy.backend import trt as poly_trt
    except ImportError as exc:
        raise FailedPrecondition(MISSING.format(reason=f"import failed: {exc}")) from None
    return poly_trt


def tensorrt_version() -> str:
    """The installed TensorRT's version (engines are valid for that version only)."""
    require_tensorrt()
    import tensorrt

    return str(tensorrt.__version__)


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    window: int,
    sensors: int,
    precision: str,
    max_batch: int = 256,
    opt_batch: int = 32,
) -> None:
    """Build a serialized TensorRT plan for `onnx_path` with a dynamic batch profile.

    OSError when the plan cannot be written (a full disk); `FailedPrecondition` when TensorRT
    cannot build it."""
    poly_trt = require_tensorrt()
    try:
        _build(poly_trt, onnx_path, engine_path, window, sensors, precision, max_batch, opt_batch)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - Polygraphy and TensorRT raise their own kinds
        raise FailedPrecondition(
            f"{onnx_path}: TensorRT cannot build a {precision} engine from it "
            f"({type(exc).__name__}: {exc})"
        ) from None


def _build(
    poly_trt: Any,
    onnx_path: Path,
    engine_path: Path,
    window: int,
    sensors: int,
    precision: str,
    max_batch: int,
    opt_batch: int,
) -> None:
    profile = poly_trt.Profile()
    for name in ("window", "mask"):
        profile.add(
            name,
            min=(1, window, sensors),
            opt=(opt_batch, window, sensors),
            max=(max_batch, window, sensors),
        )
    # INT8 variants are QDQ graphs: TensorRT takes the scales from the Q/DQ nodes, so no
    # calibrator is needed; the correlation block stays fp32 because it carries no QDQ.
    config = poly_trt.CreateConfig(
        fp16=precision in ("fp16", "int8"),
        int8=precision == "int8",
        profiles=[profile],
    )
    build = poly_trt.EngineFromNetwork(poly_trt.NetworkFromOnnxPath(str(onnx_path)), config=config)
    poly_trt.SaveEngine(build, path=str(engine_path))()


def _gpu_memory_short(exc: BaseException, engine: Any) -> str | None:
    """Whether `exc`, raised making `engine` ready to run, is the GPU's lack of memory: None
    when not; else what to add to the message. Polygraphy says only "Invalid Context" when
    TensorRT cannot make the execution context (TensorRT logs why), so besides the message
    the engine's device memory is compared with the GPU's free memory where both are known."""
    if _OUT_OF_MEMORY.search(f"{type(exc).__name__}: {exc}"):
        return ""
    needed = getattr(engine, "device_memory_size", None)
    free = gpu_free_bytes()
    if isinstance(needed, int) and free is not None and needed > free:
        return f"; it needs {needed} bytes of GPU memory, {free} are free"
    return None


def gpu_free_bytes() -> int | None:
    """The GPU's free memory in bytes (cuda-python's cudaMemGetInfo), None when unknown."""
    try:
        from cuda import cudart  # type: ignore[import-not-found, unused-ignore]

        status, free, _total = cudart.cudaMemGetInfo()
    except Exception:  # noqa: BLE001 - not installed, or no CUDA context: unknown
        return None
    return int(free) if int(status) == 0 else None


class TensorRtBackend(InferenceBackend):
    """Runs a serialized TensorRT plan with Polygraphy's runner (it manages device buffers)."""

    name = "tensorrt"

    def __init__(self, engine_path: Path) -> None:
        """`IntegrityError` naming the file when TensorRT cannot deserialize it (torn,
        truncated, or built for another TensorRT or GPU: a cached one is built again);
        `LocalStateError` when the file cannot be read (EIO), `GpuOutOfMemory` when the engine
        deserialized but the GPU has no memory to run it: this device's state now, not the
        engine's fault, so neither rebuilt nor marked failed. Any other failure to make it
        ready to run (a plugin missing, no kernel for this GPU) is the engine's: an
        `IntegrityError`."""
        poly_trt = require_tensorrt()
        try:
            data = engine_path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(
                f"{engine_path}: cannot read the TensorRT engine: it is missing"
            ) from None
        except OSError as exc:
            raise LocalStateError(
                f"cannot read the TensorRT engine {engine_path} ({exc.strerror or exc}): "
                "the disk, not the engine"
            ) from None
        try:
            engine = poly_trt.engine_from_bytes(data)
        except Exception as exc:  # noqa: BLE001 - Polygraphy and TensorRT raise their own kinds
            raise IntegrityError(
                f"{engine_path}: TensorRT cannot load this engine ({type(exc).__name__}: {exc})"
            ) from None
        if engine is None:
            raise IntegrityError(
                f"{engine_path}: TensorRT cannot load this engine (it did not deserialize)"
            )
        try:
            runner = poly_trt.TrtRunner(engine)
            runner.activate()
        except Exception as exc:  # noqa: BLE001 - Polygraphy and TensorRT raise their own kinds
            why = f"{type(exc).__name__}: {exc}"
            short = _gpu_memory_short(exc, engine)
            if short is not None:
                raise GpuOutOfMemory(
                    f"{engine_path}: TensorRT loaded this engine but the GPU has not the memory "
                    f"to run it ({why}{short}): GPU memory, not the engine; tried again later"
                ) from None
            raise IntegrityError(
                f"{engine_path}: TensorRT loaded this engine but cannot make it ready to run "
                f"on this device ({why})"
            ) from None
        self._runner = runner

    def run(self, window: FloatArray, mask: FloatArray) -> Outputs:
        feed = {
            "window": np.ascontiguousarray(window, dtype=np.float32),
            "mask": np.ascontiguousarray(mask, dtype=np.float32),
        }
        # The runner reuses its output buffers between calls, hence the copy.
        out = copy.deepcopy(self._runner.infer(feed))
        return (
            np.asarray(out["fault_prob"], dtype=np.float32),
            np.asarray(out["residual"], dtype=np.float32),
            np.asarray(out["contribution"], dtype=np.float32),
        )

    def close(self) -> None:
        self._runner.deactivate()
