"""Compute libraries get a chosen thread count, never their own all-cores default."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from edge_agent.inference.onnxruntime import OnnxRuntimeBackend
from edge_agent.inference.threads import compute_threads

pytestmark = pytest.mark.unit


def test_unset_means_the_free_cores_at_most_two() -> None:
    free = len(os.sched_getaffinity(0))
    assert compute_threads(0) == max(1, min(2, free)), f"{free} free cores"
    assert compute_threads(-1) == compute_threads(0)
    assert compute_threads(5) == 5


def test_onnx_runtime_sessions_never_take_every_core(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    for requested, expected in ((0, compute_threads(0)), (3, 3)):
        options = OnnxRuntimeBackend(path, threads=requested)._session.get_session_options()
        assert options.intra_op_num_threads == expected, (requested, options.intra_op_num_threads)
        assert options.inter_op_num_threads == 1
