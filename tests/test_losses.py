import math

import pytest
import torch

from edgekd.errors import ConfigError, UnknownNameError
from edgekd.losses import LOSSES, kd_divergence, make_loss


def test_kd_divergence_hand_computed():
    # Two classes, T = 2: p_t = softmax([2, 0] / 2) = softmax([1, 0]), p_s = softmax([0, 0]) = [0.5, 0.5].
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[2.0, 0.0]])
    pt1 = math.exp(1) / (math.exp(1) + 1)
    pt = [pt1, 1 - pt1]
    kl = sum(p * math.log(p / 0.5) for p in pt)
    assert kd_divergence(s, t, 2.0).item() == pytest.approx(kl * 4.0, rel=1e-6)  # T^2 = 4


def test_kd_is_zero_for_identical_logits():
    x = torch.randn(8, 10)
    assert kd_divergence(x, x.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_hinton_total_is_weighted_sum():
    s, t, y = torch.tensor([[1.0, -1.0, 0.5]]), torch.tensor([[0.2, 0.1, 3.0]]), torch.tensor([2])
    loss = make_loss("hinton", temperature=3.0, alpha=0.25)
    total, parts = loss(s, t, y)
    ce = -torch.log_softmax(s, 1)[0, 2].item()
    kd = kd_divergence(s, t, 3.0).item()
    assert parts["ce"] == pytest.approx(ce, rel=1e-6)
    assert total.item() == pytest.approx(0.25 * kd + 0.75 * ce, rel=1e-6)


def test_kd_gradient_scale_is_independent_of_temperature_for_large_t():
    # The T^2 factor keeps the soft-target gradient magnitude roughly constant as T grows.
    s = torch.tensor([[0.3, -0.2, 0.1]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, -1.0]])
    grads = []
    for temp in (20.0, 40.0):
        s.grad = None
        kd_divergence(s, t, temp).backward()
        grads.append(s.grad.abs().sum().item())
    assert grads[0] == pytest.approx(grads[1], rel=0.05)


def test_unknown_method_suggests():
    with pytest.raises(UnknownNameError, match="did you mean 'hinton'"):
        make_loss("hintn")


def test_bad_parameters():
    with pytest.raises(ConfigError, match="temperature"):
        make_loss("hinton", temperature=0)
    with pytest.raises(ConfigError, match="did you mean 'alpha'"):
        make_loss("hinton", alpah=0.5)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_trains_a_step(name):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    loss_fn = make_loss(name)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    teacher = torch.randn(16, 3) if loss_fn.needs_teacher else None
    before, _ = loss_fn(model(x), teacher, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        loss_fn(model(x), teacher, y)[0].backward()
        opt.step()
    after, _ = loss_fn(model(x), teacher, y)
    assert after.item() < before.item()
