import math

import pytest
import torch
import torch.nn.functional as F

from edgekd.core.errors import ConfigError, UnknownNameError
from edgekd.kd.features import Feats
from edgekd.kd import (LOSSES, Objective, Teachers, attention_map, dkd_parts, fsp_matrix, kd_divergence,
                       make_loss, rkd_angle, rkd_distance)
from edgekd.kd.features import regressor

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


# ---- the authors' formulas, written out; each names the repository and function it restates ---------

def ref_kd(s, t, T, p_t=None):
    """mdistiller, mdistiller/distillers/KD.py kd_loss: KL(p_t || p_s) per sample, batch mean, x T^2."""
    p_t = torch.softmax(t / T, 1) if p_t is None else p_t
    return F.kl_div(torch.log_softmax(s / T, 1), p_t, reduction="none").sum(1).mean() * T**2


def ref_hinton(s, t, y, T, alpha):
    """szagoruyko/attention-transfer, utils.py distillation: kl_div summed / batch x T^2, mixed with CE."""
    kl = F.kl_div(torch.log_softmax(s / T, 1), torch.softmax(t / T, 1), reduction="sum") * T**2 / len(s)
    return alpha * kl + (1 - alpha) * F.cross_entropy(s, y)


def ref_dkd(s, t, y, alpha, beta, T, p_t=None):
    """mdistiller, mdistiller/distillers/DKD.py dkd_loss (gt/other masks, cat_mask, the -1000 mask).
    ``p_t``: the teacher's probabilities at T when they are not softmax(t / T) (an ensemble's mixture)."""
    gt = torch.zeros_like(s).scatter_(1, y.unsqueeze(1), 1).bool()
    other = ~gt
    p_s = torch.softmax(s / T, 1)
    p_t = torch.softmax(t / T, 1) if p_t is None else p_t

    def binary(p):
        return torch.cat([(p * gt).sum(1, keepdim=True), (p * other).sum(1, keepdim=True)], 1)

    tckd = F.kl_div(torch.log(binary(p_s)), binary(p_t), reduction="sum") * T**2 / len(y)
    if t is not None:
        p_t2 = torch.softmax(t / T - 1000.0 * gt, 1)
    else:  # the same for given probabilities: the non-target ones, renormalized
        p_t2 = (p_t * other) / (p_t * other).sum(1, keepdim=True)
    nckd = F.kl_div(torch.log_softmax(s / T - 1000.0 * gt, 1), p_t2, reduction="sum") * T**2 / len(y)
    return alpha * tckd + beta * nckd


def ref_tfkd(out, y, alpha, T, multiplier, correct_prob=0.99):
    """yuanli2333/Teacher-free-Knowledge-Distillation, my_loss_function.py loss_kd_regularization: a
    hand-made teacher, nn.KLDivLoss()'s element-wise mean, x multiplier, mixed with CE by reg_alpha."""
    k = out.shape[1]
    u = torch.full_like(out, (1 - correct_prob) / (k - 1))
    u[torch.arange(len(y)), y] = correct_prob
    # nn.KLDivLoss()'s default in their PyTorch: the mean over every element (batch x classes)
    reg = F.kl_div(torch.log_softmax(out, 1), torch.softmax(u / T, 1), reduction="sum") / out.numel() * multiplier
    return (1 - alpha) * F.cross_entropy(out, y) + alpha * reg


def ref_at_loss(x, y):
    """szagoruyko/attention-transfer, utils.py at / at_loss (also RepDistiller AT.py, mdistiller AT.py)."""
    def at(f):
        return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))
    return (at(x) - at(y)).pow(2).mean()


def ref_fsp(maps):
    """RepDistiller, distiller_zoo/FSP.py compute_fsp (maps of one size): mean over HW of top_j * bot_i."""
    return [(bot.unsqueeze(1).flatten(3) * top.unsqueeze(2).flatten(3)).mean(-1) for bot, top in zip(maps, maps[1:])]


def ref_rkd(s, t, w_d=25.0, w_a=50.0):
    """RepDistiller, distiller_zoo/RKD.py RKDLoss.forward and pdist."""
    def pdist(e):
        sq = e.pow(2).sum(1)
        d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=1e-12).sqrt().clone()
        d[range(len(e)), range(len(e))] = 0
        return d / d[d > 0].mean()

    def angles(e):
        diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(diff, diff.transpose(1, 2)).view(-1)

    return w_d * F.smooth_l1_loss(pdist(s), pdist(t)) + w_a * F.smooth_l1_loss(angles(s), angles(t))


def _feats(student: dict, teacher: dict) -> Feats:
    return Feats(student, teacher)


def _ready(name, student, teacher, adapters=None, **params):
    term = make_loss(name, student=student, teacher=teacher, **params)
    term.adapters = torch.nn.ModuleList(adapters or [torch.nn.Identity() for _ in term.student])
    return term


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(6, 5), torch.randn(6, 5) * 3, torch.tensor([0, 1, 2, 3, 4, 2])


# ---- response terms --------------------------------------------------------------------------------

def test_kd_and_hinton_match_the_references(logits):
    s, t, y = logits
    assert kd_divergence(s, t, 4.0).item() == pytest.approx(ref_kd(s, t, 4.0).item(), rel=1e-5)
    total, _ = make_loss("hinton", temperature=3.0, alpha=0.7)(s, t, y)
    assert total.item() == pytest.approx(ref_hinton(s, t, y, 3.0, 0.7).item(), rel=1e-5)


def test_mse_is_ba_caruana_half_squared_distance_summed_over_classes(logits):
    s, t, _ = logits
    # Ba & Caruana 2014: L = 1/(2N) sum_n ||g(x_n) - z_n||^2 (summed over classes, not averaged)
    ref = ((s - t) ** 2).sum() / (2 * len(s))
    assert make_loss("mse")(s, t, None)[0].item() == pytest.approx(ref.item(), rel=1e-6)
    assert make_loss("mse")(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), None)[0].item() == pytest.approx(2.5)


def test_ce_hand_computed():
    s, y = torch.tensor([[0.0, 0.0]]), torch.tensor([1])
    assert make_loss("ce")(s, None, y)[0].item() == pytest.approx(math.log(2))
    # label smoothing 0.2 over 2 classes: targets (0.1, 0.9) on a uniform prediction: still log 2
    assert make_loss("ce", label_smoothing=0.2)(s, None, y)[0].item() == pytest.approx(math.log(2))


def test_dkd_matches_mdistiller(logits):
    s, t, y = logits
    total, parts = make_loss("dkd", alpha=2.0, beta=3.0, temperature=2.0)(s, t, y)
    assert total.item() == pytest.approx(ref_dkd(s, t, y, 2.0, 3.0, 2.0).item(), rel=1e-5)
    assert total.item() == pytest.approx(2 * parts["tckd"] + 3 * parts["nckd"], rel=1e-5)
    tckd, nckd = dkd_parts(s[:1], t[:1], y[:1], 4.0)
    p_t = torch.softmax(t[:1] / 4.0, 1)[0, y[0]].item()
    # Zhao et al. Eq. 7: KD = TCKD + (1 - p_t^teacher) NCKD (per sample)
    assert kd_divergence(s[:1], t[:1], 4.0).item() == pytest.approx(tckd.item() + (1 - p_t) * nckd.item(), rel=1e-5)


def test_dkd_two_classes_is_tckd_only_and_zero_for_identical_logits():
    s, t, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    tckd, nckd = dkd_parts(s, t, y, 2.0)
    assert nckd.item() == pytest.approx(0.0, abs=1e-6)  # one non-target class: nothing to compare
    assert tckd.item() == pytest.approx(kd_divergence(s, t, 2.0).item(), rel=1e-5)
    x = torch.randn(4, 6)
    assert make_loss("dkd")(x, x.clone(), torch.tensor([0, 1, 2, 3]))[0].item() == pytest.approx(0.0, abs=1e-5)


def test_dkd_warmup_is_mdistillers_at_240_epochs(logits):
    s, t, y = logits
    term = make_loss("dkd")
    full = ref_dkd(s, t, y, 1.0, 8.0, 4.0).item()
    for epoch in (1, 10, 20, 35):  # mdistiller DKD.forward_train: min(epoch / WARMUP, 1), WARMUP = 20 of 240
        term.set_epoch(epoch, 240)
        assert term(s, t, y)[0].item() == pytest.approx(min(epoch / 20, 1.0) * full, rel=1e-5)
    term.set_epoch(0.5, 2)  # a 2-epoch phase: the same 1/12 share, 1/6 of an epoch
    assert term.ramp == 1.0
    term.set_epoch(1 / 12, 2)
    assert term.ramp == pytest.approx(0.5)
    off = make_loss("dkd", warmup=0.0)
    off.set_epoch(0.01, 2)
    assert off.ramp == 1.0
    with pytest.raises(ConfigError, match="warmup"):
        make_loss("dkd", warmup=-1.0)


def test_tfkd_matches_the_authors_loss(logits):
    s, _, y = logits
    # defaults: their ShuffleNetV2 configuration, T 10, multiplier 1, reg_alpha 0.95 (CE 0.05)
    total, _ = Objective.single("tfkd")(s, None, y)
    assert total.item() == pytest.approx(ref_tfkd(s, y, 0.95, 10.0, 1.0).item(), rel=1e-5)
    # their ResNet-18 configuration, through a recipe: T 20, multiplier 100, reg_alpha 0.1
    recipe = Objective.from_specs([{"name": "ce", "weight": 0.9},
                                   {"name": "tfkd", "weight": 0.1, "temperature": 20.0, "multiplier": 100.0}])
    assert recipe(s, None, y)[0].item() == pytest.approx(ref_tfkd(s, y, 0.1, 20.0, 100.0).item(), rel=1e-5)


def test_tfkd_virtual_teacher_on_the_labels_device():
    term = make_loss("tfkd", correct_prob=0.7, temperature=1.0)
    q = torch.softmax(torch.tensor([[0.7, 0.1, 0.1, 0.1]]), 1)
    assert torch.allclose(term.virtual_teacher(torch.tensor([0]), 4), q)
    on_meta = term.virtual_teacher(torch.tensor([0, 3, 1]).to("meta"), 4)  # CUDA labels: built there, not on the CPU
    assert on_meta.device.type == "meta" and on_meta.shape == (3, 4)


# ---- teacher ensembles (T > 1) and groups of peers --------------------------------------------------

def _two_teachers():
    return torch.tensor([[[6.0, 0.0, 0.0]], [[0.0, 6.0, 0.0]]])  # (members, batch, classes)


def test_ensemble_is_the_average_of_softened_outputs():
    mix = Teachers(_two_teachers(), [0.5, 0.5]).log_probs(4.0).exp()
    assert torch.allclose(mix, torch.tensor([[0.423, 0.423, 0.154]]), atol=5e-4)
    # not the log of the T = 1 average softened afterwards: [.441, .441, .117]
    wrong = torch.softmax(torch.log(torch.softmax(_two_teachers(), 2).mean(0)) / 4.0, 1)
    assert torch.allclose(wrong, torch.tensor([[0.441, 0.441, 0.117]]), atol=5e-4)


def test_softening_terms_read_an_ensemble_at_their_own_temperature(logits):
    s, _, y = logits
    torch.manual_seed(1)
    z, w = torch.randn(3, 6, 5) * 4, torch.tensor([0.5, 0.3, 0.2])

    def mix(T):
        return (w.view(-1, 1, 1) * torch.softmax(z / T, 2)).sum(0)

    objective = Objective.from_specs([{"name": "kd", "temperature": 4.0}, {"name": "dkd", "temperature": 2.0}])
    objective.teacher_weights = w
    total, _ = objective(s, z.transpose(0, 1), y)  # what the loop hands over: (batch, members, classes)
    want = 0.9 * ref_kd(s, None, 4.0, p_t=mix(4.0)) + ref_dkd(s, None, y, 1.0, 8.0, 2.0, p_t=mix(2.0))
    assert total.item() == pytest.approx(want.item(), rel=1e-5)
    group = Teachers(z, w)
    assert make_loss("hinton")(s, group, y)[0].item() == pytest.approx(
        (0.9 * ref_kd(s, None, 4.0, p_t=mix(4.0)) + 0.1 * F.cross_entropy(s, y)).item(), rel=1e-5)
    mean_logits = (w.view(-1, 1, 1) * z).sum(0)  # logit matching: the members' weighted mean logits
    assert make_loss("mse")(s, group, y)[0].item() == pytest.approx(
        (((s - mean_logits) ** 2).sum() / (2 * len(s))).item(), rel=1e-5)


def test_a_peer_group_gives_one_term_per_network(logits):
    s, t, y = logits
    other = t.flip(0)
    group = Teachers.each([t, other])
    # DML (YingZhangDUT/Deep-Mutual-Learning, train_models.py _tower_loss): one KL per other network, summed
    assert kd_divergence(s, group, 1.0).item() == pytest.approx((ref_kd(s, t, 1.0) + ref_kd(s, other, 1.0)).item(),
                                                                rel=1e-5)
    dkd = make_loss("dkd")(s, group, y)[0].item()
    want = ref_dkd(s, t, y, 1.0, 8.0, 4.0) + ref_dkd(s, other, y, 1.0, 8.0, 4.0)
    assert dkd == pytest.approx(want.item(), rel=1e-5)
    hinton = make_loss("hinton")(s, group, y)[0].item()  # the label term once, the KL per peer
    want = 0.9 * (ref_kd(s, t, 4.0) + ref_kd(s, other, 4.0)) + 0.1 * F.cross_entropy(s, y)
    assert hinton == pytest.approx(want.item(), rel=1e-5)


def test_teachers_on_the_meta_device():
    group = Teachers(_two_teachers().to("meta"), [0.5, 0.5])
    assert group.weights.device.type == "meta" and group.log_probs(4.0).device.type == "meta"


# ---- feature and relation terms ---------------------------------------------------------------------

def test_at_matches_the_references_without_a_half():
    torch.manual_seed(0)
    s1, t1, s2, t2 = torch.randn(3, 4, 8, 8), torch.randn(3, 6, 8, 8), torch.randn(3, 4, 4, 4), torch.randn(3, 6, 4, 4)
    objective = Objective([("at", 1000.0, _ready("at", ["a", "b"], ["c", "d"]))])
    got = objective(None, None, None, _feats({"a": s1, "b": s2}, {"c": t1, "d": t2}))[0].item()
    # cifar.py: opt.beta * sum(loss_groups), beta = 1e3
    assert got == pytest.approx(1000 * (ref_at_loss(s1, t1) + ref_at_loss(s2, t2)).item(), rel=1e-5)
    x = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # (1, 2 channels, 1, 2)
    q = torch.tensor([(1 + 9) / 2, (4 + 0) / 2])
    assert torch.allclose(attention_map(x)[0], q / q.norm())


def test_at_pools_height_and_width_separately():
    torch.manual_seed(0)
    term = _ready("at", ["a"], ["b"])
    s, t = torch.randn(2, 3, 8, 6), torch.randn(2, 5, 4, 3)  # not square: the student pooled to 4 x 3
    assert term(None, None, None, _feats({"a": s}, {"b": t}))[0].item() == pytest.approx(
        ref_at_loss(F.adaptive_avg_pool2d(s, (4, 3)), t).item(), rel=1e-5)
    s, t = torch.randn(2, 3, 8, 3), torch.randn(2, 5, 4, 6)  # each larger in one dimension: both pooled
    assert term(None, None, None, _feats({"a": s}, {"b": t}))[0].item() == pytest.approx(
        ref_at_loss(F.adaptive_avg_pool2d(s, (4, 3)), F.adaptive_avg_pool2d(t, (4, 3))).item(), rel=1e-5)


@pytest.mark.parametrize("s_hw, t_hw, kind, kernel", [
    ((4, 4), (4, 4), torch.nn.Conv2d, (1, 1)), ((8, 6), (4, 3), torch.nn.Conv2d, (3, 3)),
    ((4, 4), (8, 8), torch.nn.ConvTranspose2d, (4, 4)), ((6, 5), (4, 4), torch.nn.Conv2d, (3, 2))])
def test_fitnet_regressor_follows_convreg(s_hw, t_hw, kind, kernel):
    # RepDistiller models/util.py and mdistiller distillers/_common.py ConvReg: conv, BN, ReLU
    reg = regressor((3, *s_hw), (7, *t_hw))
    conv, bn, relu = reg
    assert type(conv) is kind and conv.kernel_size == kernel and isinstance(bn, torch.nn.BatchNorm2d)
    assert isinstance(relu, torch.nn.ReLU) and reg(torch.randn(2, 3, *s_hw)).shape == (2, 7, *t_hw)


def test_fitnet_matches_mdistiller():
    torch.manual_seed(0)
    reg = regressor((3, 4, 4), (7, 4, 4))
    term = _ready("fitnet", ["a"], ["b"], adapters=[reg])
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 7, 4, 4).relu()
    value = term(None, None, None, _feats({"a": s}, {"b": t}))[0].item()
    # mdistiller FitNet.forward_train: F.mse_loss(conv_reg(f_s), f_t), weight 100
    assert value == pytest.approx(F.mse_loss(reg(s), t).item(), rel=1e-6)
    assert Objective.single("fitnet").terms[1][:2] == ("fitnet", 100.0)


def test_rkd_matches_repdistiller():
    torch.manual_seed(0)
    s, t = torch.randn(6, 4), torch.randn(6, 9)
    term = _ready("rkd", ["a"], ["b"])
    assert term(None, None, None, _feats({"a": s}, {"b": t}))[0].item() == pytest.approx(ref_rkd(s, t).item(), rel=1e-4)
    e = torch.tensor([[0.0], [1.0], [3.0]])  # equal distance ratios and angles: zero
    assert rkd_distance(e, 5 * e).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd_angle(e, 5 * e).item() == pytest.approx(0.0, abs=1e-6)


def test_fsp_matches_repdistiller():
    torch.manual_seed(0)
    gs = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4), torch.randn(2, 2, 4, 4)]
    gt = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4), torch.randn(2, 2, 4, 4)]
    term = _ready("fsp", ["a1", "a2", "a3"], ["b1", "b2", "b3"])
    got = term(None, None, None, _feats(dict(zip(["a1", "a2", "a3"], gs)), dict(zip(["b1", "b2", "b3"], gt))))[0]
    # helper/pretrain.py init: loss = sum(loss_group), FSP.compute_loss = (s - t).pow(2).mean()
    want = sum((a - b).pow(2).mean() for a, b in zip(ref_fsp(gs), ref_fsp(gt)))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    a, b = torch.randn(1, 2, 8, 6), torch.randn(1, 3, 4, 3)  # not square: pooled to 4 x 3
    want = ref_fsp([F.adaptive_avg_pool2d(a, (4, 3)), b])[0].transpose(1, 2)  # theirs is the transpose
    assert torch.allclose(fsp_matrix(a, b), want, atol=1e-6)


def test_fsp_is_a_first_stage():
    stage, rest = Objective.single("fsp").stages()
    assert stage.names == ["fsp"] and rest.names == ["ce"]
    assert Objective.single("kd").stages()[0] is None
    fsp = make_loss("fsp")
    # RepDistiller: init_epochs 30 before 240 epochs -> 1/8 of the run's epochs, at least 1
    assert [fsp.stage_epochs(n) for n in (3, 12, 240)] == [1, 2, 30]
    _, rest = Objective.from_specs([{"name": "fsp"}, {"name": "dkd"}]).stages()
    assert rest.names == ["dkd"]


def test_objective_adapters_follow_to():
    fitnet = _ready("fitnet", ["a"], ["b"], adapters=[regressor((3, 4, 4), (7, 4, 4))])
    fsp = _ready("fsp", ["a", "c"], ["b", "d"], adapters=[torch.nn.Conv2d(3, 7, 1), torch.nn.Identity()])
    objective = Objective([("fitnet", 100.0, fitnet), ("fsp", 1.0, fsp)])
    objective.to("meta")
    tensors = list(objective.parameters()) + list(objective.buffers())
    assert len(tensors) > 5 and all(t.device.type == "meta" for t in tensors)


# ---- objectives ---------------------------------------------------------------------------------------

def test_single_method_objective_uses_paper_weights():
    assert [(n, w) for n, w, _ in Objective.single("dkd").terms] == [("ce", 1.0), ("dkd", 1.0)]
    assert [(n, w) for n, w, _ in Objective.single("at").terms] == [("ce", 1.0), ("at", 1000.0)]
    assert [(n, w) for n, w, _ in Objective.single("hinton").terms] == [("hinton", 1.0)]
    assert [(n, w) for n, w, _ in Objective.single("mse").terms] == [("mse", 1.0)]
    assert [(n, w) for n, w, _ in Objective.single("tfkd").terms] == [("ce", 0.05), ("tfkd", 0.95)]
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    total, _ = Objective.single("kd")(s, t, y)
    assert total.item() == pytest.approx(make_loss("hinton")(s, t, y)[0].item(), rel=1e-6)


def test_every_term_documents_its_defaults():
    for name in LOSSES.names():
        cls = LOSSES.get(name)
        assert cls.__doc__ and len(cls.__doc__.split()) > 5, name
