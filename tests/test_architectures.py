"""quant.quantize on real architectures: forward at 2/4/8 bits, qdq export, parity with PyTorch.

The default suite runs tiny models built in code that contain the graph patterns of the
torchvision families (squeeze-excitation with hardsigmoid/sigmoid, hardswish and SiLU, channel
split + shuffle, concatenation, residual adds, max-pooling in front of a convolution). The
torchvision models themselves (random weights, 1x28x28 inputs) are marked slow: ``pytest -m slow``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgekd import models, quant
from edgekd.backends import get_backend
from edgekd.export import onnx as export, passes as onnx_passes
from edgekd.backends import onnxruntime as ortb

TORCHVISION = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1",
               "efficientnet_b0"]
# Float convolutions ORT leaves at 8 bits, with why (see README "Architectures").
KNOWN_FLOAT = {"shufflenet_v2_x0_5": "signed concat quantizer after ReLU: Relu -> int8 Q is not fused"}


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, gate: nn.Module):
        super().__init__()
        self.pool, self.fc1, self.act, self.fc2, self.gate = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, 4, 1), nn.ReLU(), nn.Conv2d(4, c, 1), gate

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class Zoo(nn.Module):
    """One block of each family: MobileNetV3 (hardswish, SE with hardsigmoid), EfficientNet (SiLU,
    SE with sigmoid, residual), ShuffleNetV2 (chunk, concat, channel shuffle), SqueezeNet (fire
    concat), ResNet (max-pool stem, residual add)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.mbv3 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.Hardswish(),
                                  SqueezeExcite(16, nn.Hardsigmoid()), nn.Conv2d(16, 16, 1))
        self.eff = nn.Sequential(nn.Conv2d(16, 16, 1), nn.SiLU(), SqueezeExcite(16, nn.Sigmoid()), nn.Conv2d(16, 16, 1))
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1), nn.ReLU())
        self.squeeze, self.e1, self.e3 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.mbv3(x)
        x = self.relu(x + self.eff(x))
        a, b = x.chunk(2, dim=1)
        x = torch.cat((a, self.branch(b)), 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        s = self.relu(self.squeeze(x))
        x = torch.cat((self.relu(self.e1(s)), self.relu(self.e3(s))), 1)
        return self.head(x)




def quantize_export_check(model, shape, bits, tmp_path, n=64):
    torch.manual_seed(0)
    models.calibrate_batchnorm(model, shape)
    q = models.random_passes(quant.quantize(model, quant.QuantSpec(weight_bits=min(bits, 7), act_bits=bits, first_last_bits=7)), shape)
    x = torch.randn(n, *shape)
    with torch.no_grad():
        want = q(x).numpy()
    assert want.shape == (n, 10) and np.isfinite(want).all() and want.std() > 1e-3
    path = tmp_path / f"m{bits}.onnx"
    export.export_onnx(q, "qdq", x[:1], path, 13)
    import onnx

    assert onnx_passes.qdq_violations(onnx.load(str(path))) == []
    got = get_backend("onnxruntime").infer(path, x.numpy())
    return want, got, ortb.fusion_report(path)


@pytest.mark.parametrize("bits", [pytest.param(2, marks=pytest.mark.slow), 4, pytest.param(8, marks=pytest.mark.slow)])
def test_zoo_block_quantizes_exports_and_matches(bits, tmp_path):
    torch.manual_seed(0)
    want, got, fusion = quantize_export_check(Zoo(), (1, 16, 16), bits, tmp_path)
    assert np.abs(want - got).max() <= 1e-4 + 0.02 * np.abs(want).max()
    assert (want.argmax(1) == got.argmax(1)).mean() >= 0.98
    assert fusion["quantized_compute"] > 0


def test_zoo_layers_are_all_quantized():
    q = quant.quantize(Zoo(), quant.QuantSpec(weight_bits=4, act_bits=4))
    import brevitas.nn as qnn

    assert not [n for n, m in q.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert sum(isinstance(m, (qnn.QuantConv2d, qnn.QuantLinear)) for m in q.modules()) == 16


FAST = ("resnet18", "squeezenet1_1")


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in TORCHVISION])
def test_torchvision_model_traces_and_quantizes(name):
    """Fast part: every listed torchvision model traces and quantizes (no forward pass)."""
    model = models.build_model(f"torchvision:{name}", 10, (1, 28, 28))
    q = quant.quantize(model, quant.QuantSpec(weight_bits=4, act_bits=4))
    assert any(type(m).__name__ == "QuantConv2d" for m in q.modules())


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_quantize_export_parity(name, bits, tmp_path):
    model = models.build_model(f"torchvision:{name}", 10, (1, 28, 28))
    want, got, fusion = quantize_export_check(model, (1, 28, 28), bits, tmp_path, n=32)
    assert np.abs(want - got).max() <= 1e-4 + 0.02 * np.abs(want).max()
    assert (want.argmax(1) == got.argmax(1)).mean() >= 0.95
    if name not in KNOWN_FLOAT:
        assert fusion["float_compute"] == 0, fusion["float_ops"]


def test_first_conv_adapted_to_input_channels():
    for name in FAST:
        model = models.build_model(f"torchvision:{name}", 7, (1, 28, 28))
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert first.in_channels == 1
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
