import math

import pytest
import torch

from edgekd.core.errors import ConfigError, UnknownNameError
from edgekd.kd.features import Feats
from edgekd.kd import (LOSSES, Objective, attention_map, dkd_parts, fsp_matrix, kd_divergence, make_loss,
                           rkd_angle, rkd_distance)

LOGIT_TERMS = [n for n in LOSSES.names() if not LOSSES.get(n).__dataclass_fields__.get("student")]


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


@pytest.mark.parametrize("name", LOGIT_TERMS)  # feature terms: tests/test_methods.py
def test_every_loss_trains_a_step(name):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    loss_fn = Objective.single(name)  # the term at its paper weight, with its CE
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    teacher = torch.randn(16, 3) if loss_fn.needs_teacher else None
    before, _ = loss_fn(model(x), teacher, y)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(5):
        opt.zero_grad()
        loss_fn(model(x), teacher, y)[0].backward()
        opt.step()
    after, _ = loss_fn(model(x), teacher, y)
    assert after.item() < before.item()


# ---- hand-computed values of every registered term -------------------------------------------------

def test_mse_hand_computed():
    s, t = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    assert make_loss("mse")(s, t, None)[0].item() == pytest.approx(0.5 * (1 + 4) / 2)


def test_ce_hand_computed():
    s, y = torch.tensor([[0.0, 0.0]]), torch.tensor([1])
    assert make_loss("ce")(s, None, y)[0].item() == pytest.approx(math.log(2))
    # label smoothing 0.2 over 2 classes: targets (0.1, 0.9) on a uniform prediction: still log 2
    assert make_loss("ce", label_smoothing=0.2)(s, None, y)[0].item() == pytest.approx(math.log(2))


def test_dkd_reduces_to_its_parts():
    torch.manual_seed(0)
    s, t, y = torch.randn(1, 5), torch.randn(1, 5), torch.tensor([2])
    tckd, nckd = dkd_parts(s, t, y, 4.0)
    p_t = torch.softmax(t / 4.0, 1)[0, 2].item()
    # Zhao et al. Eq. 7: KD = TCKD + (1 - p_t^teacher) NCKD (per sample)
    assert kd_divergence(s, t, 4.0).item() == pytest.approx(tckd.item() + (1 - p_t) * nckd.item(), rel=1e-5)
    total, parts = make_loss("dkd", alpha=2.0, beta=3.0)(s, t, y)
    assert total.item() == pytest.approx(2 * parts["tckd"] + 3 * parts["nckd"], rel=1e-6)
    assert make_loss("dkd", alpha=0.0, beta=0.0)(s, t, y)[0].item() == 0.0


def test_dkd_two_classes_is_tckd_only_and_zero_for_identical_logits():
    s, t, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    tckd, nckd = dkd_parts(s, t, y, 2.0)
    assert nckd.item() == pytest.approx(0.0, abs=1e-6)  # one non-target class: nothing to compare
    assert tckd.item() == pytest.approx(kd_divergence(s, t, 2.0).item(), rel=1e-5)
    x = torch.randn(4, 6)
    assert make_loss("dkd")(x, x.clone(), torch.tensor([0, 1, 2, 3]))[0].item() == pytest.approx(0.0, abs=1e-5)


def test_tfkd_virtual_teacher_hand_computed():
    term = make_loss("tfkd", correct_prob=0.7, temperature=1.0, multiplier=1.0)
    y = torch.tensor([0])
    q = torch.softmax(torch.tensor([[0.7, 0.1, 0.1, 0.1]]), 1)
    assert torch.allclose(term.virtual_teacher(y, 4), q)
    assert term(q.log(), None, y)[0].item() == pytest.approx(0.0, abs=1e-6)  # student = virtual teacher
    s = torch.zeros(1, 4)
    kl = sum(p * math.log(p / 0.25) for p in q[0].tolist())
    # nn.KLDivLoss()'s default element-wise mean (the authors' code) divides by the 4 classes too
    assert term(s, None, y)[0].item() == pytest.approx(kl / 4, rel=1e-5)


def _feats(student: dict, teacher: dict) -> Feats:
    return Feats(student, teacher)


def _ready(name, student, teacher, adapters=None, **params):
    term = make_loss(name, student=student, teacher=teacher, **params)
    term.adapters = torch.nn.ModuleList(adapters or [torch.nn.Identity() for _ in term.student])
    return term


def test_fitnet_hand_computed():
    term = _ready("fitnet", ["a"], ["b"])
    f = _feats({"a": torch.ones(2, 3, 4, 4)}, {"b": torch.zeros(2, 3, 4, 4)})
    assert term(None, None, None, f)[0].item() == pytest.approx(1.0)
    f = _feats({"a": torch.ones(2, 3, 4, 4)}, {"b": torch.ones(2, 3, 2, 2)})  # sizes differ: pooled
    assert term(None, None, None, f)[0].item() == pytest.approx(0.0)


def test_attention_map_hand_computed_and_scale_invariant():
    x = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # (1, 2 channels, 1, 2)
    q = torch.tensor([(1 + 9) / 2, (4 + 0) / 2])
    assert torch.allclose(attention_map(x)[0], q / q.norm())
    term = _ready("at", ["a"], ["b"])
    s = torch.randn(3, 4, 5, 5)
    assert term(None, None, None, _feats({"a": s}, {"b": 7 * s}))[0].item() == pytest.approx(0.0, abs=1e-6)
    assert term(None, None, None, _feats({"a": s}, {"b": torch.randn(3, 8, 5, 5)}))[0].item() > 0


def test_rkd_hand_computed_and_invariant_to_scaling():
    # three points on a line at 0, 1, 3: distances 1, 2, 3 (mean 2); equal ratios give zero loss
    e = torch.tensor([[0.0], [1.0], [3.0]])
    assert rkd_distance(e, 5 * e).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd_angle(e, 5 * e).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.tensor([[0.0], [2.0], [3.0]])  # distances 2, 1, 3 (mean 2): |1/2 - 2/2| on 4 of 9 entries
    assert rkd_distance(e, other).item() == pytest.approx(4 * 0.5 * 0.5**2 / 9, rel=1e-5)  # Huber, |d| < 1
    s = torch.randn(6, 4)
    term = _ready("rkd", ["a"], ["b"])
    assert term(None, None, None, _feats({"a": s}, {"b": 0.01 * s}))[0].item() == pytest.approx(0.0, abs=1e-5)


def test_fsp_matrix_hand_computed():
    a = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    b = torch.tensor([[[[3.0, 1.0]]]])  # (1, 1, 1, 2)
    g = fsp_matrix(a, b)
    assert torch.allclose(g, torch.tensor([[[(3 + 2) / 2], [(0 + 1) / 2]]]))
    term = _ready("fsp", ["a1", "a2"], ["b1", "b2"])
    f = _feats({"a1": a, "a2": b}, {"b1": a.clone(), "b2": b.clone()})
    assert term(None, None, None, f)[0].item() == 0.0
    f.teacher["b2"] = 2 * b
    assert term(None, None, None, f)[0].item() == pytest.approx(((2 * g - g) ** 2).mean().item())


def test_single_method_objective_uses_paper_weights():
    assert [(n, w) for n, w, _ in Objective.single("dkd").terms] == [("ce", 1.0), ("dkd", 1.0)]
    assert [(n, w) for n, w, _ in Objective.single("at").terms] == [("ce", 1.0), ("at", 1000.0)]
    assert [(n, w) for n, w, _ in Objective.single("hinton").terms] == [("hinton", 1.0)]
    assert [(n, w) for n, w, _ in Objective.single("mse").terms] == [("mse", 1.0)]
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    total, _ = Objective.single("kd")(s, t, y)
    assert total.item() == pytest.approx(make_loss("hinton")(s, t, y)[0].item(), rel=1e-6)


def test_every_term_documents_its_defaults():
    for name in LOSSES.names():
        cls = LOSSES.get(name)
        assert cls.__doc__ and len(cls.__doc__.split()) > 5, name
