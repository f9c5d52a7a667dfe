"""Mobile blocks (#13): depthwise-separable convolutions, squeeze-excitation gates, Hardswish / SiLU.

A tiny model of that kind (named ``tests.test_mobile_quant:tiny_mobile``, a module:callable spec)
trains at W4A4 on digits through ``distill`` with falling loss, its quantized graph has the
quantizers edgekd.quant.mobile puts around smooth activations and depthwise weights, and its
ONNX Runtime bundle agrees with PyTorch.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from edgekd import api, models, quant
from edgekd.quant import mobile

SPEC = "tests.test_mobile_quant:tiny_mobile"


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, gate: type[nn.Module]):
        super().__init__()
        self.pool, self.fc1, self.relu = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, 8, 1), nn.ReLU()
        self.fc2, self.gate = nn.Conv2d(8, c, 1), gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


def _ds(cin: int, cout: int, stride: int, act: type[nn.Module], gate: type[nn.Module]) -> list[nn.Module]:
    """Depthwise 3x3 -> BN -> act -> SE -> pointwise 1x1 -> BN -> act."""
    return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), act(),
            SqueezeExcite(cin, gate), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), act()]


def tiny_mobile(num_classes: int = 10, in_channels: int = 1, act: str = "hardswish") -> nn.Module:
    a, g = (nn.SiLU, nn.Sigmoid) if act == "silu" else (nn.Hardswish, nn.Hardsigmoid)
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), a(),
                         *_ds(16, 32, 2, a, g), *_ds(32, 32, 1, a, g),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


def tiny_mobile_silu(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return tiny_mobile(num_classes, in_channels, act="silu")


@pytest.fixture(scope="module")
def w4a4_run(tmp_path_factory):
    """3 float + 3 QAT epochs at W4A4 on digits, QAT only (no teacher), float lr 1e-2 (QAT: lr/4)."""
    root = tmp_path_factory.mktemp("mobile")
    torch.manual_seed(0)
    opts = api.DistillOptions(data="digits", student=SPEC, method="none", weight_bits=4, act_bits=4,
                              float_epochs=3, epochs=3, lr=1e-2, progress=False)
    return root / "run", api.distill(opts, out=root / "run")


def test_tiny_mobile_trains_at_w4a4_with_falling_loss(w4a4_run):
    _, m = w4a4_run
    qat = [r for r in m["history"] if r["phase"] == "qat"]
    assert len(qat) == 3 and qat[-1]["loss"] < qat[0]["loss"]
    # float 90.3%; W4A4 86.6% (before the quantizers of edgekd.quant.mobile: 79.1%, the loss
    # rising from 0.52 to 0.99 at the switch to QAT); chance is 10%
    assert m["student_accuracy"] > 0.75
    assert m["student_accuracy"] >= m["student_float_accuracy"] - 0.07


def _act_quantizers(q) -> dict:
    import brevitas.nn as qnn

    out = {}
    for node in q.graph.nodes:
        if node.op == "call_module" and isinstance(q.get_submodule(node.target), (qnn.QuantIdentity, qnn.QuantReLU)):
            out[node] = q.get_submodule(node.target)
    return out


@pytest.mark.parametrize("act", ["hardswish", "silu"])
def test_quantizers_around_smooth_activations_and_depthwise_weights(act):
    q = quant.quantize(tiny_mobile(act=act), quant.QuantSpec(weight_bits=4, act_bits=4))
    before, after = [], []
    for node, m in _act_quantizers(q).items():
        bits = int(m.act_quant.bit_width())
        if all(mobile.is_smooth(q, u) for u in node.users):  # conv output -> Hardswish / SiLU / gate
            before.append((bits, m.act_quant.is_signed))
        elif node.args and mobile.is_smooth(q, node.args[0]) or "mul" in str(node.args[0]):
            after.append(bits)
    # stem, 2 x (depthwise, SE expand -> gate, pointwise): 7 requantizers in front of a smooth
    # activation, all signed 8-bit; what the activations feed is quantized once, at 4 bits
    assert before == [(8, True)] * 7
    assert after and set(after) == {4}
    stats = {type(m.weight_quant.tensor_quant.scaling_impl.parameter_list_stats.stats.stats_impl).__name__
             for m in q.modules() if type(m).__name__ == "QuantConv2d" and m.groups > 1}
    assert stats == {"MSEThreshold"}


def test_depthwise_threshold_minimises_the_quantization_error():
    torch.manual_seed(0)
    w = torch.randn(64, 9)
    w[:, 0] *= 4  # one large weight per channel: at 2 bits, its maximum rounds the rest to zero
    t = mobile.MSEThreshold(stats_reduce_dim=1, bit_width=2)(w)

    def err(threshold):
        s = threshold.unsqueeze(1)
        return ((torch.clamp(torch.round(w / s), -1, 1) * s - w) ** 2).sum()

    amax = w.abs().amax(1)
    assert (t <= amax + 1e-6).all()
    assert err(t) < 0.85 * err(amax)  # Brevitas's default threshold, the absolute maximum
    assert all(err(t) <= err(f * amax) * 1.01 for f in torch.linspace(0.05, 1.0, 39))


def test_conventions_hold_for_the_new_quantizers():
    """Power-of-two scales (FPGA) and signed activations (TensorRT) reach the 8-bit requantizers too."""
    spec = quant.QuantSpec(weight_bits=4, act_bits=4, scale_type="po2", act_after_relu="signed", bias="float")
    q = models.random_passes(quant.quantize(tiny_mobile(), spec), (1, 8, 8))
    for m in _act_quantizers(q).values():
        scale = float(m.act_quant.scale())
        assert m.act_quant.is_signed and math.log2(scale) == round(math.log2(scale))


def test_relu_only_graph_is_left_alone():
    q = quant.quantize(models.build_model("cnn-student", 10, (1, 8, 8)), quant.QuantSpec(weight_bits=4, act_bits=4))
    assert {int(m.act_quant.bit_width()) for n, m in _act_quantizers(q).items() if n.name != "input_1_quant"} == {4}


def test_mobile_bundle_matches_pytorch(w4a4_run, tmp_path):
    run_dir, m = w4a4_run
    manifest = api.export(run_dir, "cpu", out=tmp_path / "bundle", student=SPEC)
    assert manifest["parity"]["top1_agreement"] >= 0.99
    assert manifest["torch_accuracy"] == pytest.approx(m["student_accuracy"], abs=1e-6)
    assert manifest["fusion"]["float_compute"] == 0  # every Conv/Gemm on integer kernels


def test_students_with_depthwise_convolutions_keep_the_float_lr_in_qat():
    from edgekd.quant.mobile import default_qat_lr

    depthwise = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1))
    plain = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=2))  # grouped, not depthwise
    lines = []
    assert default_qat_lr(2e-3, True, depthwise, lines.append) == 2e-3
    assert lines and "depthwise" in lines[0]
    assert default_qat_lr(2e-3, True, plain) == 5e-4
    assert default_qat_lr(2e-3, False, plain) == 2e-3  # no warm start: QAT from scratch at lr


def _after_smooth_quantizers(q) -> list:
    return [m for node, m in _act_quantizers(q).items()
            if node.args and mobile._after_smooth(q, node.args[0]) and not all(mobile.is_smooth(q, u) for u in node.users)]


@pytest.mark.parametrize("bits,relu,signed", [(2, "unsigned", False), (4, "unsigned", True), (2, "signed", True)])
def test_after_smooth_quantizers_are_unsigned_at_2_bits_where_the_target_allows(bits, relu, signed):
    """A signed 2-bit grid keeps one positive level for a Hardswish output; unsigned keeps three (TensorRT's
    convention, signed activations everywhere, stays)."""
    q = quant.quantize(tiny_mobile(), quant.QuantSpec(weight_bits=bits, act_bits=bits, act_after_relu=relu))
    after = _after_smooth_quantizers(q)
    assert after and {(int(m.act_quant.bit_width()), bool(m.act_quant.is_signed)) for m in after} == {(bits, signed)}


def test_a_raised_after_smooth_quantizer_takes_the_signedness_of_its_bits():
    """W2A2 with the depthwise inputs at 8 bits: those quantizers go back to signed, the rest stay unsigned."""
    spec = quant.QuantSpec(weight_bits=2, act_bits=2, layer_bits=(quant.layerbits.parse_text("depthwise=W8A8"),))
    q = quant.quantize(tiny_mobile(), spec)
    seen = {(int(m.act_quant.bit_width()), bool(m.act_quant.is_signed)) for m in _after_smooth_quantizers(q)}
    assert seen == {(8, True), (2, False)}


def test_every_2_bit_weight_scale_starts_from_the_error_minimising_threshold():
    def stats(q, depthwise):
        return {type(m.weight_quant.tensor_quant.scaling_impl.parameter_list_stats.stats.stats_impl).__name__
                for m in q.modules() if type(m).__name__ in ("QuantConv2d", "QuantLinear")
                and (getattr(m, "groups", 1) > 1) == depthwise}
    two = quant.quantize(tiny_mobile(), quant.QuantSpec(weight_bits=2, act_bits=2, first_last_bits="same"))
    four = quant.quantize(tiny_mobile(), quant.QuantSpec(weight_bits=4, act_bits=4))
    assert stats(two, False) == {"MSEThreshold"} and stats(two, True) == {"MSEThreshold"}
    assert stats(four, False) == {"AbsMax"} and stats(four, True) == {"MSEThreshold"}


def test_the_threshold_works_per_tensor():
    torch.manual_seed(0)
    w = torch.randn(16, 9)
    t = mobile.MSEThreshold(stats_reduce_dim=None, bit_width=2)(w)
    err = lambda s: float(((torch.clamp(torch.round(w / s), -1, 1) * s - w) ** 2).sum())  # noqa: E731
    assert t.dim() == 0 and err(t) < err(w.abs().max()) and err(t) <= min(err(f * w.abs().max()) for f in (0.3, 0.5, 0.7))


def test_w2a2_mobile_bundle_with_unsigned_2_bit_activations_matches_pytorch(tmp_path):
    """The unsigned 2-bit quantizers after Hardswish / SE products export to ONNX Runtime's QDQ graph bit-exactly."""
    torch.manual_seed(0)
    opts = api.DistillOptions(data="digits", student=SPEC, method="none", weight_bits=2, act_bits=2,
                              layer_bits=["depthwise=W8A8"], float_epochs=1, epochs=1, progress=False)
    m = api.distill(opts, out=tmp_path / "run")
    manifest = api.export(tmp_path / "run", "cpu", out=tmp_path / "bundle", student=SPEC)
    assert manifest["parity"]["top1_agreement"] == 1.0
    assert manifest["torch_accuracy"] == pytest.approx(m["student_accuracy"], abs=1e-6)
    unsigned = [r for r in quant.describe(quant.quantize(tiny_mobile(), quant.QuantSpec(weight_bits=2, act_bits=2)))
                if r.get("act_bits") == 2 and not r["signed"]]
    assert unsigned  # the graph exported has them
