"""The ONNX Runtime backend and the backend registry, on tiny graphs built with onnx.helper."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekd import backends
from edgekd.backends import onnxruntime as ortb
from edgekd.core.errors import EdgekdError, MissingExtraError, MissingFileError, UnknownNameError

RNG = np.random.default_rng(0)


def save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def gemm_model(path: Path, batch="N"):
    """y = x @ w.T + b for x [batch, 4]; returns (path, w, b)."""
    w, b = RNG.standard_normal((3, 4)).astype(np.float32), RNG.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return save(graph, path), w, b


def float_cnn(path: Path) -> Path:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, all float."""
    inits = [numpy_helper.from_array(RNG.standard_normal((4, 1, 3, 3)).astype(np.float32), "cw"),
             numpy_helper.from_array(RNG.standard_normal((3, 4)).astype(np.float32), "fw")]
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "fw"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    return save(graph, path)


def qdq_conv(path: Path) -> Path:
    """An int8 QDQ convolution (the layout an int8 export produces): Q/DQ around a float Conv."""
    scalar = lambda v, dt, name: numpy_helper.from_array(np.array(v, dt), name)
    inits = [numpy_helper.from_array(RNG.integers(-127, 128, (4, 1, 3, 3)).astype(np.int8), "wq"),
             scalar(0.02, np.float32, "ws"), scalar(0, np.int8, "wz"), scalar(0.05, np.float32, "xs"),
             scalar(0, np.uint8, "xz"), scalar(0.1, np.float32, "ys"), scalar(0, np.uint8, "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"]),
             helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    return save(graph, path)


# --- sessions and running -----------------------------------------------------------------------------

def test_run_matches_numpy(tmp_path):
    path, w, b = gemm_model(tmp_path / "m.onnx")
    session = ortb.make_session(path, threads=1)
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(ortb.run(session, x), x @ w.T + b, rtol=1e-5, atol=1e-6)
    timed = ortb.timed_call(session, x)
    np.testing.assert_allclose(timed()[0], x @ w.T + b, rtol=1e-5, atol=1e-6)


def test_make_session_threads_and_default_provider(tmp_path):
    path, _, _ = gemm_model(tmp_path / "m.onnx")
    session = ortb.make_session(path, threads=1)
    assert session.get_session_options().intra_op_num_threads == 1
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert ortb.make_session(path).get_session_options().intra_op_num_threads == 0


def test_select_providers_keeps_only_available_ones():
    assert ortb.select_providers(None) == ["CPUExecutionProvider"]
    assert ortb.select_providers(["NoSuchExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(EdgekdError, match="none of the execution providers") as info:
        ortb.select_providers(["NoSuchExecutionProvider"])
    assert "CPUExecutionProvider" in info.value.hint


def test_make_session_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(MissingFileError):
        ortb.make_session(tmp_path / "absent.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf")
    with pytest.raises(EdgekdError, match="ONNX Runtime cannot load") as info:
        ortb.make_session(garbage)
    assert "\n" not in info.value.one_line()
    path, _, _ = gemm_model(tmp_path / "m.onnx")
    with pytest.raises(EdgekdError, match="threads must be >= 0"):
        ortb.make_session(path, threads=-1)


def test_input_info_fixed_and_dynamic_batch(tmp_path):
    dynamic = ortb.input_info(ortb.make_session(gemm_model(tmp_path / "d.onnx")[0]))
    fixed = ortb.input_info(ortb.make_session(gemm_model(tmp_path / "f.onnx", batch=1)[0]))
    assert (dynamic["name"], dynamic["fixed_batch"], dynamic["shape"][1]) == ("x", None, 4)
    assert fixed["fixed_batch"] == 1


# --- offline optimization and fusion --------------------------------------------------------------------

def ops_of(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_optimize_levels_and_equal_outputs(tmp_path):
    model = qdq_conv(tmp_path / "q.onnx")
    basic = ortb.optimize(model, tmp_path / "q.basic.onnx", level="basic")
    extended = ortb.optimize(model, tmp_path / "q.ext.onnx", level="extended")
    assert "Conv" in ops_of(basic) and "QLinearConv" not in ops_of(basic)  # basic keeps Q/DQ + float Conv
    assert "QLinearConv" in ops_of(extended) and "Conv" not in ops_of(extended)
    x = RNG.standard_normal((2, 1, 8, 8)).astype(np.float32)
    reference = ortb.run(ortb.make_session(model, level="disabled"), x)
    for path in (basic, extended):
        # the fused kernel rounds once in int32; the unfused graph may differ by one output step (0.1)
        np.testing.assert_allclose(ortb.run(ortb.make_session(path, level="disabled"), x), reference, atol=0.1 + 1e-6)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no leftovers


def test_optimize_to_ort_format_and_bad_level(tmp_path):
    model = float_cnn(tmp_path / "c.onnx")
    out = ortb.optimize(model, tmp_path / "c.ort", level="basic")
    x = RNG.standard_normal((1, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(ortb.run(ortb.make_session(out), x), ortb.run(ortb.make_session(model), x),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(EdgekdError, match="unknown optimization level"):
        ortb.optimize(model, tmp_path / "c2.onnx", level="maximum")


def test_fusion_report_float_model(tmp_path):
    report = ortb.fusion_report(float_cnn(tmp_path / "c.onnx"))
    assert report["available"] and report["level"] == "all"
    assert report["quantized_compute"] == 0 and report["float_compute"] == 2
    assert report["quantized_fraction"] == 0.0


def test_fusion_report_int8_model_runs_in_int8(tmp_path):
    model = qdq_conv(tmp_path / "q.onnx")
    report = ortb.fusion_report(model)
    assert report["quantized_ops"] == {"QLinearConv": 1} and report["float_compute"] == 0
    assert report["quantized_fraction"] == 1.0
    basic = ortb.fusion_report(model, level="basic")  # before ORT's Q/DQ fusion the Conv is float
    assert basic["float_ops"] == {"Conv": 1} and basic["quantized_compute"] == 0


def test_fusion_report_without_onnx(tmp_path, monkeypatch):
    model = qdq_conv(tmp_path / "q.onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)
    report = ortb.fusion_report(model)
    assert report["available"] is False and "onnx" in report["reason"]


# --- environment --------------------------------------------------------------------------------------

def test_describe_environment(tmp_path):
    env = ortb.describe_environment()
    for key in ("cpu_model", "cpu_count", "python", "platform", "machine", "edgekd_version", "onnxruntime_version",
                "providers_available"):
        assert env[key], key
    assert "providers_used" not in env
    session = ortb.make_session(gemm_model(tmp_path / "m.onnx")[0], threads=2)
    env = ortb.describe_environment(session)
    assert env["providers_used"] == ["CPUExecutionProvider"] and env["intra_op_threads"] == 2


def test_optional_host_facts_read_when_present(monkeypatch, tmp_path):
    files = {"/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor": "performance",
             "/sys/class/thermal/thermal_zone0/temp": "45500"}
    monkeypatch.setattr(backends.host, "_read", lambda path: files.get(path))
    tool = tmp_path / "vcgencmd"
    tool.write_text("#!/bin/sh\necho throttled=0x50000\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    facts = backends.host._optional_facts()
    assert facts["cpu_governor"] == "performance"
    assert facts["temperature_c"] == pytest.approx(45.5)
    assert facts["rpi_throttled"] == "throttled=0x50000"
    assert "jetson_release" not in facts  # unreadable facts are absent, not None


# --- registry -----------------------------------------------------------------------------------------

def test_registry_maps_onnxruntime_to_runner(tmp_path):
    assert sorted(backends.backend_names()) == ["onnxruntime", "qonnx", "tensorrt"]
    runner = backends.get_runner("onnxruntime")
    assert runner is ortb.RUNNER and runner.name == "onnxruntime"
    path, w, b = gemm_model(tmp_path / "m.onnx")
    handle = runner.load(path, threads=1)
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(runner.run(handle, x), x @ w.T + b, rtol=1e-5)
    assert runner.input_info(handle)["name"] == "x"


def test_registry_unknown_and_missing_backends(monkeypatch, tmp_path):
    with pytest.raises(UnknownNameError, match="did you mean 'onnxruntime'"):
        backends.get_runner("onnxruntim")
    # a backend module that exists but whose runtime package is not installed
    (tmp_path / "edgekd_fake_backend.py").write_text(
        "from edgekd.backends import Backend\n"
        "class Fake(Backend):\n"
        "    name, package, extra, purpose = 'fake', 'edgekd_fake_runtime_xyz', 'fake', 'running a fake bundle'\n"
        "    def runner(self):\n"
        "        import edgekd_fake_runtime_xyz\n"
        "BACKEND = Fake()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(backends, "_REGISTERED", {})
    backends.register_backend("edgekd_fake_backend", name="fake")
    with pytest.raises(MissingExtraError) as info:
        backends.get_runner("fake")
    assert info.value.one_line() == ("running a fake bundle needs the 'edgekd_fake_runtime_xyz' package, which is "
                                     "not installed; install it with: pip install 'edgekd[fake]'")
