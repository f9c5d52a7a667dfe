"""Export flavours on tiny quantized models built in code: structure of each flavour's graph
(qdq: no Clip between Q and DQ, zero points, axes, opset) and parity with PyTorch at 2, 4, 8 bits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgekd import models, quant
from edgekd.backends import get_backend
from edgekd.export import onnx as export, passes as onnx_passes
from edgekd.backends import onnxruntime as ortb
from edgekd.core.errors import EdgekdError

SHAPE = (1, 8, 8)


def calibrated(arch: str, spec: quant.QuantSpec, seed: int = 0):
    """A quantized model whose activation scales were set by a few training-mode passes."""
    torch.manual_seed(seed)
    return models.random_passes(quant.quantize(models.build_model(arch, 10, SHAPE), spec), SHAPE, steps=4, batch=32)


def spec_at(bits: int, **kw) -> quant.QuantSpec:
    # "8-bit" weights are 7-bit on this kind of host (onnxruntime-cpu's reduce_range convention):
    # x86 CPUs without VNNI saturate in ORT's u8s8 kernels with full 8-bit weights.
    kw.setdefault("first_last_bits", 7)
    return quant.QuantSpec(weight_bits=min(bits, 7), act_bits=bits, **kw)


def export_to(tmp_path, model, flavour: str, name: str = "m"):
    path = tmp_path / f"{name}.{flavour}.onnx"
    export.export_onnx(model, flavour, torch.zeros(1, *SHAPE), path, 13)
    return path, onnx.load(str(path))


def inits(model) -> dict:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def parity_on_random(model, path, n: int = 128):
    x = torch.randn(n, *SHAPE)
    with torch.no_grad():
        want = model(x).numpy()
    got = get_backend("onnxruntime").infer(path, x.numpy())
    return want, got


# ---- qdq ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[2, 4, 8], ids=lambda b: f"bits{b}")
def qdq_export(request, tmp_path_factory):
    bits = request.param
    model = calibrated("resnet-student", spec_at(bits))
    path, proto = export_to(tmp_path_factory.mktemp("qdq"), model, "qdq")
    return bits, model, path, proto


def test_qdq_has_no_clip_between_q_and_dq(qdq_export):
    _, _, _, proto = qdq_export
    assert onnx_passes.qdq_violations(proto) == []
    consts = inits(proto)
    acts = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in consts]
    assert acts and all(consts[n.input[2]].dtype == np.uint8 for n in acts), "ORT convention: uint8 activations"
    producers = {o: n for n in proto.graph.node for o in n.output}
    consts = inits(proto)
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] not in consts:
            assert producers[node.input[0]].op_type == "QuantizeLinear"
        if node.op_type == "Clip":  # any remaining Clip works on floats, never on Q's integers
            assert producers[node.input[0]].op_type == "DequantizeLinear"


def test_qdq_weights_are_int8_on_the_low_bit_grid(qdq_export):
    bits, _, _, proto = qdq_export
    consts = inits(proto)
    weight_dqs = [n for n in onnx_passes.weight_dequantizers(proto) if consts[n.input[0]].dtype == np.int8]
    assert len(weight_dqs) == 10  # 9 convolutions + the classifier
    limits = []
    for node in weight_dqs:
        w, scale, zp = (consts[name] for name in node.input[:3])
        assert not zp.any(), "weights are symmetric: zero point 0"
        assert scale.shape == (w.shape[0],), "one scale per output channel"
        assert next(a.i for a in node.attribute if a.name == "axis") == 0
        limits.append(int(np.abs(w).max()))
    qmax = 2 ** (min(bits, 7) - 1) - 1
    assert max(limits[1:-1]) <= qmax  # hidden layers on their low-bit grid
    assert max(limits[0], limits[-1]) <= 2 ** 6 - 1  # first/last layers at 7 bits


def test_qdq_opset_and_checker(qdq_export):
    _, _, _, proto = qdq_export
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 13
    onnx.checker.check_model(proto)


def test_qdq_parity_and_full_fusion(qdq_export):
    _, model, path, _ = qdq_export
    want, got = parity_on_random(model, path)
    assert (want.argmax(1) == got.argmax(1)).mean() >= 0.99
    assert np.abs(want - got).max() <= 1e-3 + 0.05 * np.abs(want).max()
    fusion = ortb.fusion_report(path)
    assert fusion["float_compute"] == 0, fusion["float_ops"]
    assert fusion["quantized_compute"] == 10


@pytest.mark.parametrize("bits", [2, pytest.param(4, marks=pytest.mark.slow), pytest.param(8, marks=pytest.mark.slow)])
def test_qdq_parity_plain_cnn(tmp_path, bits):
    model = calibrated("cnn-student", spec_at(bits))
    path, proto = export_to(tmp_path, model, "qdq")
    want, got = parity_on_random(model, path)
    assert (want.argmax(1) == got.argmax(1)).all()
    assert np.abs(want - got).max() <= 1e-3 + 0.05 * np.abs(want).max()
    assert ortb.fusion_report(path)["float_compute"] == 0


def test_qdq_per_tensor_po2_scales(tmp_path):
    model = calibrated("cnn-student", spec_at(4, weight_scaling="per_tensor", scale_type="po2"))
    _, proto = export_to(tmp_path, model, "qdq")
    consts = inits(proto)
    for node in onnx_passes.weight_dequantizers(proto):
        scale = consts[node.input[1]]
        if consts[node.input[0]].dtype == np.int8:
            assert scale.size == 1
            assert np.log2(scale) == pytest.approx(np.round(np.log2(scale)))


def test_qdq_tensorrt_conventions(tmp_path):
    """TensorRT: int8 activations with zero point 0 even after ReLU, float bias, 8-bit activations."""
    model = calibrated("cnn-student", spec_at(8, act_after_relu="signed", bias="float", first_last_bits=8))
    path, proto = export_to(tmp_path, model, "qdq")
    consts = inits(proto)
    assert onnx_passes.qdq_violations(proto) == []
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = consts[node.input[2]]
            assert zp.dtype in (np.int8, np.int32) and not zp.any(), node.name
    assert not any(v.dtype == np.int32 for v in consts.values()), "bias stays float"
    assert not any(n.op_type == "Clip" for n in proto.graph.node)


# ---- qcdq and qonnx ------------------------------------------------------------------------------

def test_qcdq_keeps_brevitas_clips_below_8_bits(tmp_path):
    model = calibrated("cnn-student", spec_at(4))
    path, proto = export_to(tmp_path, model, "qcdq")
    clips = [n for n in proto.graph.node if n.op_type == "Clip"]
    assert clips and onnx_passes.qdq_violations(proto)  # Clip between Q and DQ: not plain Q/DQ
    want, got = parity_on_random(model, path)
    assert (want.argmax(1) == got.argmax(1)).all()


def test_qonnx_has_low_bit_quant_nodes(tmp_path):
    pytest.importorskip("qonnx")
    model = calibrated("cnn-student", spec_at(4, first_last_bits=8))
    path, proto = export_to(tmp_path, model, "qonnx")
    consts = inits(proto)
    quant_nodes = [n for n in proto.graph.node if n.op_type == "Quant"]
    assert quant_nodes
    widths = sorted({int(consts[n.input[3]]) for n in quant_nodes if n.input[3] in consts})
    assert 4 in widths and 8 in widths
    x = np.random.default_rng(0).standard_normal((4, *SHAPE)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = get_backend("qonnx").infer(path, x)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_unknown_flavour(tmp_path):
    model = calibrated("cnn-student", spec_at(8))
    with pytest.raises(EdgekdError, match="unknown export flavour"):
        export.export_onnx(model, "tflite", torch.zeros(1, *SHAPE), tmp_path / "m.onnx", 13)


# ---- the passes on their own -----------------------------------------------------------------------

def test_fold_constant_clips_applies_the_clip():
    from onnx import TensorProto, helper

    w = np.array([[-9, 3], [8, -1]], np.int8)
    graph = helper.make_graph(
        [helper.make_node("Clip", ["w", "lo", "hi"], ["wc"]),
         helper.make_node("DequantizeLinear", ["wc", "s", "z"], ["wf"]),
         helper.make_node("MatMul", ["x", "wf"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(-7, np.int8), "lo"),
         numpy_helper.from_array(np.array(7, np.int8), "hi"),
         numpy_helper.from_array(np.array(0.5, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert onnx_passes.fold_constant_clips(model) == 1
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "MatMul"]
    folded = inits(model)[model.graph.node[0].input[0]]
    np.testing.assert_array_equal(folded, [[-7, 3], [7, -1]])
    assert set(inits(model)) == {folded_name for folded_name in inits(model)} and "w" not in inits(model)


# ---- conventions follow the target ------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("onnxruntime-cpu", {"act_after_relu": "unsigned", "weight_scaling": "per_channel", "bias": "int32", "weight_bits": 7,
                         "first_last_bits": 7}),
    ("onnxruntime-arm", {"act_after_relu": "unsigned", "weight_bits": 8, "first_last_bits": 8}),
    ("tensorrt-int8", {"act_after_relu": "signed", "bias": "float", "weight_scaling": "per_channel"}),
    ("qonnx-finn", {"act_after_relu": "unsigned", "bias": "float"}),
    ("qonnx-hls4ml", {"scale_type": "po2", "weight_scaling": "per_tensor"}),
])
def test_spec_follows_target_conventions(name, expected):
    from edgekd import catalog

    target = catalog.load_target(name)
    spec = quant.spec_for_target(target, 8, 8)
    assert {k: getattr(spec, k) for k in expected} == expected
    assert target.flavour in export.FLAVOURS
    assert quant.spec_for_target(target, 4, 2, first_last_bits="same").first_last_bits == "same"
