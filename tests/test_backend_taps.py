"""``Backend.run_tapped``: the runtime side of ``edgekd explain`` lives in the backends. A backend
without it (or a manifest naming no backend at all) gives explain's note, not a crash, and the note
names the backends that do implement it, asked of the registry; ONNX Runtime's returns every tap's
real value exactly as ONNX Runtime computes it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgekd import backends
from edgekd.backends import Backend
from edgekd.export import probe
from edgekd.pipeline import explain

W = np.array([[0.5, -0.25, 0.75], [1.0, 0.125, -0.5], [-0.75, 0.25, 0.5], [0.25, -1.0, 0.0]], np.float32)
ACT_SCALE, OUT_SCALE = 0.05, 0.1


def tiny_qdq() -> onnx.ModelProto:
    """x (N, 4) -> Q/DQ -> MatMul by a Q/DQ int8 weight (4, 3) -> Q/DQ (the tap) -> y (N, 3)."""
    w_scale = np.float32(1 / 64)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_in", "zp_in"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "s_in", "zp_in"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "s_w", "zp_w"], ["w"]),
             helper.make_node("MatMul", ["x_dq", "w"], ["mm"], name="fc"),
             helper.make_node("QuantizeLinear", ["mm", "s_out", "zp_out"], ["mm_q"]),
             helper.make_node("DequantizeLinear", ["mm_q", "s_out", "zp_out"], ["y"])]
    inits = [numpy_helper.from_array(np.float32(ACT_SCALE), "s_in"), numpy_helper.from_array(np.uint8(128), "zp_in"),
             numpy_helper.from_array(np.rint(W / w_scale).astype(np.int8), "w_q"),
             numpy_helper.from_array(w_scale, "s_w"), numpy_helper.from_array(np.int8(0), "zp_w"),
             numpy_helper.from_array(np.float32(OUT_SCALE), "s_out"), numpy_helper.from_array(np.uint8(100), "zp_out")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def direct(model: onnx.ModelProto, outputs: list[str], x: np.ndarray) -> list[np.ndarray]:
    """ONNX Runtime run straight on ``model`` with ``outputs`` added as graph outputs by hand."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in outputs if n != "y")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(copy.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(outputs, {"x": x})


def test_onnxruntime_run_tapped_returns_the_runtimes_values(tmp_path):
    model = tiny_qdq()
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    tapped = probe.taps(model, [("fc", W.shape)])
    assert tapped == {"fc": probe.Tap("mm_q", "s_out", "zp_out")}
    tapped["logits"] = probe.Tap("y")
    x = np.random.default_rng(0).normal(0, 1.5, (300, 4)).astype(np.float32)  # two batches of at most 256
    values = backends.get_backend("onnxruntime").run_tapped(path, model, tapped, x)
    raw, y = direct(model, ["mm_q", "y"], x)
    assert raw.dtype == np.uint8 and len(np.unique(raw)) > 5  # a real spread of levels, not all clipped
    expected = (raw.astype(np.float64) - 100) * np.float64(np.float32(OUT_SCALE))
    assert set(values) == {"fc", "logits"} and values["fc"].dtype == np.float64
    np.testing.assert_array_equal(values["fc"], expected)
    np.testing.assert_array_equal(values["logits"], y.astype(np.float64))
    levels = probe.levels(model, tapped["fc"], values["fc"])
    np.testing.assert_array_equal(levels, raw.astype(np.float64) - 100)  # back on the integer grid exactly


class _NoTaps(Backend):
    name, title = "notaps", "No Taps"


class _Declines(Backend):
    """Implements run_tapped, but declines this bundle (None)."""

    name, title = "declines", "Declines"

    def run_tapped(self, model_path, model, tapped, x):
        return None


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(backends, "_REGISTERED", dict(backends._REGISTERED))
    backends.register_backend(_NoTaps())
    backends.register_backend(_Declines())
    yield
    backends.unregister_backend("notaps")
    backends.unregister_backend("declines")


def test_backend_without_run_tapped_gives_the_note_not_a_crash(registry, tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    onnx.save(tiny_qdq(), str(bundle / "model.onnx"))
    log = []
    for name in ("notaps", "nosuchruntime", None, ["onnxruntime"]):
        values, note = explain._runtime(bundle, {"backend": name}, None, np.zeros((2, 4), np.float32), log.append)
        assert values == {} and note.startswith("runtime comparison is done for ONNX Runtime, QONNX and Declines "
                                                "bundles; this one is "), note
        assert note.endswith(repr(name)) and "No Taps" not in note and "TensorRT" not in note
    # a backend implementing run_tapped that returns None for this bundle: the same note after the run
    identity = torch.fx.symbolic_trace(torch.nn.Identity())  # no Conv / Linear: no layer taps, only the logits
    identity_graph = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "id", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]), opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(identity_graph, str(bundle / "model.onnx"))
    values, note = explain._runtime(bundle, {"backend": "declines"}, identity, np.zeros((2, 1), np.float32), log.append)
    assert values == {} and note.endswith("this one is 'declines'") and log == []


def test_registry_lists_the_backends_with_run_tapped():
    names = [b.name for b in backends.implementing("run_tapped")]
    assert names == ["onnxruntime", "qonnx"]  # tensorrt reads no layer outputs (yet)
