import pytest
import torch
from torch import nn

from edgekd import models, quant
from edgekd.core.errors import ConfigError, EdgekdError


def _bits(model):
    return {r["name"]: r for r in quant.describe(model)}


@pytest.mark.parametrize("arch", ["cnn-student", "resnet-student"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_forward_is_on_the_grid(arch, bits):
    torch.manual_seed(0)
    q = quant.quantize(models.build_model(arch, 10, (1, 8, 8)), quant.QuantSpec(weight_bits=bits, act_bits=bits))
    q.train()
    x = torch.randn(32, 1, 8, 8)
    for _ in range(3):
        q(x)
    q.eval()
    out = q(x)
    assert out.shape == (32, 10) and torch.isfinite(out).all()
    rows = quant.describe(q)
    weights = [r["weight_bits"] for r in rows if "weight_bits" in r]
    assert weights[0] == 8 and weights[-1] == 8  # first and last layer kept at 8 bits
    assert all(b == bits for b in weights[1:-1])
    acts = [r for r in rows if r["kind"] == "QuantReLU"]
    assert acts and all(r["act_bits"] == bits and not r["signed"] for r in acts)
    # A ReLU quantizer's output takes at most 2**bits distinct values.
    relu = next(m for m in q.modules() if type(m).__name__ == "QuantReLU")
    out = relu(torch.randn(1000) * 3)
    values = getattr(out, "value", out).unique()
    assert len(values) <= 2**bits


def test_first_last_same_bits():
    q = quant.quantize(models.build_model("cnn-student", 10, (1, 8, 8)),
                       quant.QuantSpec(weight_bits=2, act_bits=2, first_last_bits=None))
    assert {r["weight_bits"] for r in quant.describe(q) if "weight_bits" in r} == {2}


def test_signed_activations_for_tensorrt_convention():
    q = quant.quantize(models.build_model("cnn-student", 10, (1, 8, 8)),
                       quant.QuantSpec(act_after_relu="signed"))
    assert all(r["signed"] for r in quant.describe(q) if r["kind"] == "QuantReLU")


def test_bits_out_of_range():
    with pytest.raises(ConfigError, match="between 2 and 8"):
        quant.QuantSpec(weight_bits=1)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.branch = Branchy()

    def forward(self, x):
        return self.branch(self.conv(x))


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return -x


def test_untraceable_model_names_the_module():
    with pytest.raises(EdgekdError, match="at module 'branch'"):
        quant.quantize(Untraceable(), quant.QuantSpec())


def test_reload_reproduces_outputs(tiny_run):
    from edgekd import api
    from edgekd.data import load_dataset
    from edgekd.training import accuracy

    run_dir, metrics = tiny_run
    model, meta = api.load_student(run_dir)
    assert accuracy(model, load_dataset("digits").test) == pytest.approx(metrics["student_accuracy"], abs=1e-9)


def test_quantizer_scales_train_at_a_tenth_of_the_lr():
    from edgekd.training.optim import SCALE_LR_FACTOR, optimizer, param_groups

    q = quant.quantize(models.build_model("cnn-student", 10, (1, 8, 8)), quant.QuantSpec(weight_bits=2, act_bits=2))
    quant.materialize(q, (1, 8, 8))
    groups = param_groups(q, 5e-4)
    scale_ids = {id(p) for n, p in q.named_parameters() if quant.is_quantizer_param(n)}
    assert scale_ids and {id(p) for p in groups[-1]["params"]} == scale_ids and groups[-1]["weight_decay"] == 0.0
    assert all(id(p) not in scale_ids for g in groups[:-1] for p in g["params"])
    opt, sched = optimizer(groups, "adamw", 3e-3, 10)
    assert [g["max_lr"] for g in opt.param_groups] == pytest.approx([3e-3, 3e-3, 3e-3 * SCALE_LR_FACTOR])
    assert SCALE_LR_FACTOR == 0.1
    float_groups = param_groups(models.build_model("cnn-student", 10, (1, 8, 8)), 5e-4)
    assert len(float_groups) == 2  # a float model: no scale group (a float phase's checkpoint is unchanged)
