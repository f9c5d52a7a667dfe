"""The QONNX (FPGA) backend: batched execution with qonnx's executor, FINN/hls4ml input rules,
the resource estimate, estimated bench rows, and an end-to-end FPGA export on digits."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("qonnx")

from edgekd import bench  # noqa: E402
from edgekd.backends import qonnx as qb  # noqa: E402
from edgekd.core.fsutil import sha256_file  # noqa: E402

QDOMAIN = "qonnx.custom_op.general"


def _qonnx_model(path, act_scale=0.25, weight_scale=0.5, zeropt=0.0, act_signed=0, extra_op=None):
    """input [1,1,4,4] -> Quant(8b) -> Conv(Quant(4b) weights, 2 ch) -> Relu -> Quant(4b) -> Reshape[1,-1]
    (a batch pinned to 1, as cleaned-up Brevitas exports have) -> Gemm -> logits [1, 3]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = {
        "s_in": np.array(1 / 16, np.float32), "z0": np.array(0.0, np.float32), "b8": np.array(8.0, np.float32),
        "w": rng.normal(size=(2, 1, 3, 3)).astype(np.float32), "s_w": np.array(weight_scale, np.float32),
        "b4": np.array(4.0, np.float32), "s_a": np.array(act_scale, np.float32), "z_a": np.array(zeropt, np.float32),
        "shape": np.array([1, 8], np.int64),
        "g": rng.normal(size=(8, 3)).astype(np.float32),
    }
    q = lambda name, x, s, z, b, signed: helper.make_node("Quant", [x, s, z, b], [name], domain=QDOMAIN,
                                                          signed=signed, narrow=0, rounding_mode="ROUND")
    nodes = [q("xq", "input", "s_in", "z0", "b8", 1), q("wq", "w", "s_w", "z0", "b4", 1),
             helper.make_node("Conv", ["xq", "wq"], ["c"], kernel_shape=[3, 3], strides=[1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), q("a", "r", "s_a", "z_a", "b4", act_signed),
             helper.make_node("Reshape", ["a", "shape"], ["f"]), helper.make_node("MatMul", ["f", "g"], ["logits"])]
    if extra_op:
        nodes[-1] = helper.make_node("MatMul", ["f", "g"], ["m"])
        nodes.append(helper.make_node(extra_op, ["m"], ["logits"]))
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QDOMAIN, 1)])
    onnx.save(model, str(path))
    return path


def test_batched_execution_matches_one_by_one(tmp_path):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    path = _qonnx_model(tmp_path / "q.onnx")
    x = np.random.default_rng(1).uniform(0, 1, size=(7, 1, 4, 4)).astype(np.float32)
    model = ModelWrapper(str(path)).transform(InferShapes())
    one = np.concatenate([execute_onnx(model, {"input": x[i: i + 1]})["logits"] for i in range(len(x))])
    # 3 + 3 + 1 (padded); a batched float MatMul may sum in another order: 1-ulp differences
    np.testing.assert_allclose(qb.run(path, x, batch=3), one, rtol=1e-6, atol=1e-6)
    assert ModelWrapper(str(path)).get_tensor_shape("input") == [1, 1, 4, 4]  # the file keeps batch 1


def test_clean_model_meets_finn_and_hls4ml_rules(tmp_path):
    path = _qonnx_model(tmp_path / "q.onnx")
    assert qb.check_rules(path, "finn") == []
    assert qb.check_rules(path, "hls4ml") == []


@pytest.mark.parametrize("kwargs, toolflow, rule, level", [
    ({"zeropt": 1.0}, "finn", "zero_point", "error"),
    ({"act_signed": 1}, "finn", "unsigned_after_relu", "warning"),
    ({"act_scale": 0.3}, "hls4ml", "po2_scale", "error"),
    ({"act_scale": 0.3}, "finn", None, None),  # FINN absorbs float scales into thresholds
    ({"extra_op": "Softmax"}, "finn", "supported_ops", "error"),
    ({"extra_op": "Softmax"}, "hls4ml", None, None),
])
def test_rule_violations_are_found(tmp_path, kwargs, toolflow, rule, level):
    findings = qb.check_rules(_qonnx_model(tmp_path / "q.onnx", **kwargs), toolflow)
    assert [(f["rule"], f["level"]) for f in findings] == ([(rule, level)] if rule else [])


def test_estimate_numbers():
    cost = {"macs": 1_000_000.0, "bops": 16e6, "weight_bits": 100_000.0}
    kv260 = {"lut": 117120, "dsp": 1248, "bram_36k": 144, "uram": 64, "part": "xck26"}
    est = qb.estimate(cost, kv260, weight_bits=4, act_bits=4)
    assert est["source"] == "estimated" and est["mac_lane"] == "lut"
    assert est["bram_36k"] == 3  # ceil(100000 / 36864)
    lanes = est["mac_lanes"]
    assert lanes == int(117120 * qb.LUT_SHARE // est["luts_per_lane"])
    assert est["cycles_per_inference"] == -(-1_000_000 // lanes)
    assert est["throughput_ips"] == pytest.approx(100e6 / est["cycles_per_inference"])
    wide = qb.estimate(cost, kv260, weight_bits=8, act_bits=8)
    assert wide["mac_lane"] == "dsp" and wide["mac_lanes"] == 1248
    assert qb.estimate(cost, kv260, 2, 2)["mac_lanes"] > lanes  # fewer bits, more lanes


def _fake_fpga_bundle(root):
    root.mkdir()
    _qonnx_model(root / "model.onnx")
    np.savez_compressed(root / "eval.npz", x=np.zeros((4, 1, 4, 4), np.float32), y=np.zeros(4, np.int64))
    estimate = qb.estimate({"macs": 1e5, "bops": 1.6e6, "weight_bits": 1e4}, {"lut": 117120, "dsp": 1248,
                           "bram_36k": 144}, 4, 4)
    manifest = {"name": root.name, "target": "qonnx-finn", "backend": "qonnx", "format": "qonnx",
                "model_file": "model.onnx", "weight_bits": 4, "act_bits": 4, "input_shape": [1, 4, 4],
                "input_name": "input", "classes": list("abc"), "normalization": {"mean": [0], "std": [1]},
                "torch_accuracy": 0.9, "runtime_accuracy": 0.9, "parity": {"n": 4, "top1_agreement": 1.0,
                "max_abs_diff": 0.0}, "edgekd_version": "0", "fpga_estimates": {"kv260": estimate},
                "files": {p.name: sha256_file(p) for p in sorted(root.iterdir())}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root, estimate


def test_bench_rows_of_an_fpga_bundle_are_estimated(tmp_path):
    root, est = _fake_fpga_bundle(tmp_path / "b")
    settings = bench.resolve_settings(batch_sizes=(1, 8))
    rows = bench.bench_bundle(root, settings, profile="kv260")
    assert [r.status for r in rows] == ["ok", "ok"] and {r.source for r in rows} == {"estimated"}
    assert rows[1].latency_ms["p50"] == pytest.approx(8 / est["throughput_ips"] * 1e3)
    assert rows[0].estimate["profile"] == "kv260" and rows[0].accuracy == 0.9 and rows[0].timed_runs is None
    skipped = bench.bench_bundle(root, settings, profile="rpi5")
    assert {r.status for r in skipped} == {"skipped"} and "rpi5" in skipped[0].note


# --- end to end: distill on digits for the FPGA target, export, parity -----------------------------------

@pytest.fixture(scope="module")
def fpga_run(tmp_path_factory):
    from edgekd import api

    root = tmp_path_factory.mktemp("fpga")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        opts = api.DistillOptions(weight_bits=4, act_bits=4, target="qonnx-finn", method="none", epochs=1,
                                  float_epochs=1, progress=False)
        api.distill(opts, out=root / "run")
    finally:
        os.chdir(cwd)
    return root


def test_fpga_export_parity_and_estimate(fpga_run):
    from edgekd import api

    m = api.export(fpga_run / "run", "fpga", out=fpga_run / "bundle")
    assert m["backend"] == "qonnx" and m["source"] == "estimated"
    assert m["parity"]["n"] == 359 and m["parity"]["top1_agreement"] >= 0.999 and m["parity"]["max_abs_diff"] <= 1e-3
    assert not [f for f in m["rule_findings"] if f["level"] == "error"]
    assert {"kv260", "zcu104", "pynq-z2"} <= set(m["fpga_estimates"])
    assert all(e["source"] == "estimated" for e in m["fpga_estimates"].values())
    rows = bench.bench_bundle(fpga_run / "bundle", bench.resolve_settings(), profile="kv260")
    assert rows[0].source == "estimated" and rows[0].status in ("ok", "fail")
