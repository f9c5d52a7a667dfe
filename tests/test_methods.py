"""Every registered method and scheme trains a tiny (quantized) student for a few steps, generated
from the registries; recipes, layer names and the teacher cache. Tiny data built in code."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgekd import models, quant, training as tr
from edgekd.kd import features
from edgekd.pipeline.distill import parse_recipe
from edgekd.training import schemes
from edgekd.data import Dataset, Split
from edgekd.core.errors import ConfigError, UnknownNameError
from edgekd.kd import LOSSES, Objective


def _split(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 1, (n, 1, 8, 8)).astype(np.float32)
    x[np.arange(n), 0, y * 2, :] += 2.0  # a learnable signal: a bright row per class
    return Split(x, y.astype(np.int64))


@pytest.fixture(scope="module")
def tiny():
    return Dataset("tiny", _split(64, 0), _split(16, 1), _split(16, 2), ["a", "b", "c"], [0.0], [1.0])


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return models.cnn_teacher(num_classes=3, width=8).eval()


@pytest.fixture(scope="module")
def qstudent():
    torch.manual_seed(0)
    return quant.quantize(models.cnn_student(num_classes=3, width=4), quant.QuantSpec(weight_bits=4, act_bits=4))


def _cfg(**kw):
    return tr.FitConfig(**{"epochs": 1, "lr": 1e-3, "batch_size": 32, "progress": False, **kw})


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_method_trains_a_quantized_student(name, tiny, teacher, qstudent):
    student = copy.deepcopy(qstudent)
    objective = Objective.single(name)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    res = tr.fit(student, tiny, _cfg(), objective, teacher if objective.needs_teacher else None)
    assert np.isfinite(res.history[0]["loss"])
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items() if k.endswith("weight"))
    if objective.wants_layers:  # named layers were hooked on the quantized student and teacher
        assert objective.student_layers and objective.teacher_layers


def test_adapters_are_trained_with_the_student(tiny, teacher, qstudent):
    objective = Objective.single("fitnet")
    tr.fit(copy.deepcopy(qstudent), tiny, _cfg(), objective, teacher)
    (reg,) = objective.terms[1][2].adapters
    # ConvReg (RepDistiller, mdistiller): conv + BN + ReLU, at the middle of the 8x8, 4x4, 2x2 resolutions
    assert [type(m).__name__ for m in reg] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert (reg[0].in_channels, reg[0].out_channels) == (8, 16)  # stage 2: 8 student -> 16 teacher channels
    weights = reg[0].weight.detach().clone()
    tr.fit(copy.deepcopy(qstudent), tiny, _cfg(), objective, teacher)
    assert not torch.equal(weights, reg[0].weight)


def test_quantized_student_hooks_give_float_values(tiny, qstudent):
    names = [r["name"] for r in features.layer_table(qstudent, torch.from_numpy(tiny.train.x[:2]))]
    assert "1" not in names  # batch norm merged away
    with features.FeatureHooks(qstudent, ["2"]) as hooks:
        qstudent(torch.from_numpy(tiny.train.x[:2]))
        out = hooks.take()["2"]
    assert type(out) is torch.Tensor


def test_bad_layer_name_suggests(tiny, teacher, qstudent):
    objective = Objective.from_specs([{"name": "fitnet", "student": ["3.bodyy"], "teacher": ["3.relu"]}])
    with pytest.raises(UnknownNameError, match="no layer '3.bodyy'"):
        tr.fit(copy.deepcopy(qstudent), tiny, _cfg(), objective, teacher)
    with pytest.raises(UnknownNameError, match="did you mean '3.relu'"):
        features.FeatureHooks(teacher, ["3.rel"], "teacher")


def test_teacher_cache_matches_live_teacher(tiny, teacher):
    x = torch.from_numpy(tiny.train.x)
    cache = tr.build_teacher_cache(teacher, x, ["3.relu"])
    idx = torch.tensor([5, 0, 17])
    logits, feats = cache.get(idx)
    assert cache.logits.dtype == torch.float16 and feats["3.relu"].shape[0] == 3
    with torch.no_grad():
        assert torch.allclose(logits, teacher(x[idx]), atol=2e-2, rtol=1e-2)


def test_teacher_cache_holds_both_orientations_under_random_flips(tiny, teacher):
    """Random flips no longer turn the cache off: the mirrored images' outputs are cached too, and a
    flipped sample gets the teacher's output on the flipped image."""
    lines = []
    x = torch.from_numpy(tiny.train.x)
    cache = tr.teacher_cache(teacher, x, flip=True, layers=["3.relu"], log=lines.append)
    assert cache is not None and "both orientations" in lines[0]
    idx, flipped = torch.tensor([3, 0, 9, 12]), torch.tensor([True, False, True, False])
    logits, feats = cache.get(idx, flipped)
    seen = x[idx].clone()
    seen[flipped] = seen[flipped].flip(-1)
    with torch.no_grad():
        assert torch.allclose(logits, teacher(seen), atol=2e-2, rtol=1e-2)
        want = features.FeatureHooks(teacher, ["3.relu"], "teacher")
        teacher(seen)
        assert torch.allclose(feats["3.relu"], want.take()["3.relu"], atol=2e-2, rtol=1e-2)
        want.remove()


def test_random_crops_turn_the_cache_off(tiny, teacher):
    lines = []
    assert tr.teacher_cache(teacher, torch.from_numpy(tiny.train.x), flip=True, log=lines.append, crop=True) is None
    assert "teacher cache off" in lines[0] and "crops" in lines[0]


def test_cached_and_live_training_agree(tiny, teacher, qstudent):
    results = []
    for cache in (None, False):
        student = copy.deepcopy(qstudent)
        tr.fit(student, tiny, _cfg(seed=3), Objective.single("kd"), teacher, cache=cache)
        results.append(tr.predict(student, torch.from_numpy(tiny.test.x)))
    assert torch.allclose(results[0], results[1], atol=0.2)  # fp16 targets: equal up to rounding


def test_ensemble_averages_probabilities(teacher):
    other = copy.deepcopy(teacher)
    for p in other.parameters():
        p.data.mul_(0.5)
    ens = schemes.Ensemble([teacher, other], [3.0, 1.0]).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        want = 0.75 * teacher(x).softmax(1) + 0.25 * other(x).softmax(1)
        assert torch.allclose(ens(x).softmax(1), want, atol=1e-6)
        logit_mean = schemes.Ensemble([teacher, other], mix="logits").eval()(x)
        assert torch.allclose(logit_mean, (teacher(x) + other(x)) / 2, atol=1e-5)


def test_ensemble_hands_its_members_to_the_terms(tiny, teacher, qstudent):
    other = copy.deepcopy(teacher)
    for p in other.parameters():
        p.data.mul_(0.5)
    ens = schemes.Ensemble([teacher, other], [3.0, 1.0]).eval()
    objective = Objective.single("kd")  # T = 4
    loop_teacher = schemes.for_distillation(objective, ens)
    x, y = torch.from_numpy(tiny.train.x), torch.from_numpy(tiny.train.y)
    cache = tr.build_teacher_cache(loop_teacher, x)
    assert cache.logits.shape == (len(x), 2, 3)  # every member's logits, kept by the cache
    idx, s = torch.arange(8), torch.randn(8, 3)
    with torch.no_grad():
        mix = 0.75 * torch.softmax(teacher(x[idx]) / 4, 1) + 0.25 * torch.softmax(other(x[idx]) / 4, 1)
    # mdistiller kd_loss on the ensemble's softened outputs averaged at T = 4, with CE 0.1 / KD 0.9
    kd = F.kl_div(torch.log_softmax(s / 4, 1), mix, reduction="none").sum(1).mean() * 16
    want = 0.1 * F.cross_entropy(s, y[idx]) + 0.9 * kd
    assert objective(s, cache.get(idx)[0], y[idx])[0].item() == pytest.approx(want.item(), rel=1e-2)
    for cache_opt in (None, False):  # the loop runs it from the cache and live
        tr.fit(copy.deepcopy(qstudent), tiny, _cfg(), objective, loop_teacher, cache=cache_opt)
    by_logits = schemes.Ensemble([teacher, other], mix="logits")
    assert schemes.for_distillation(objective, by_logits) is by_logits and objective.teacher_weights is None


def _ref_dml_kl(logits1, logits2):
    """YingZhangDUT/Deep-Mutual-Learning, train_models.py kl_loss_compute: KL(p2 || p1), batch mean."""
    p1, p2 = torch.softmax(logits1, 1), torch.softmax(logits2, 1)
    return (p2 * torch.log(1e-8 + p2 / (p1 + 1e-8))).sum(1).mean()


def test_dml_with_two_peers_sums_one_kl_per_other_network():
    from edgekd.kd.features import FeatureHooks
    from edgekd.training.loop import _Step, mutual_loss

    torch.manual_seed(0)
    s, p1, p2, y = torch.randn(6, 4), torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    # _tower_loss: network i's loss is CE_i + the sum over j != i of kl_loss_compute(logits_i, logits_j)
    want = (F.cross_entropy(p1, y) + _ref_dml_kl(p1, s) + _ref_dml_kl(p1, p2)
            + F.cross_entropy(p2, y) + _ref_dml_kl(p2, s) + _ref_dml_kl(p2, p1))
    assert mutual_loss([p1, p2], s, y).item() == pytest.approx(want.item(), rel=1e-5)
    nets = [torch.nn.Linear(3, 4) for _ in range(3)]
    step = _Step(nets[0], nets[1:], Objective.single("kd"))
    step.s_hooks = FeatureHooks(nets[0], ())
    xb = torch.randn(6, 3)
    loss = step(xb, y, None, {}, 1.0)[0]
    with torch.no_grad():
        s, p1, p2 = (n(xb) for n in nets)
    kd = sum(F.kl_div(torch.log_softmax(s / 4, 1), torch.softmax(p / 4, 1), reduction="none").sum(1).mean() * 16
             for p in (p1, p2))  # the student's KD term: one KL per peer, summed
    want = 0.1 * F.cross_entropy(s, y) + 0.9 * kd + mutual_loss([p1, p2], s, y)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_dml_trains_peers(tiny, qstudent):
    peers = [models.cnn_student(num_classes=3, width=4) for _ in range(2)]
    before = [copy.deepcopy(p.state_dict()) for p in peers]
    tr.fit(copy.deepcopy(qstudent), tiny, _cfg(), Objective.single("kd"), peers=peers)
    for b, peer in zip(before, peers):
        assert any(not torch.equal(b[k], v) for k, v in peer.state_dict().items())


def test_the_loop_tells_the_objective_where_the_phase_stands(tiny, teacher, qstudent):
    objective = Objective.single("dkd", warmup=1.0)  # ramp over the whole phase
    term, seen = objective.terms[1][2], []
    set_epoch = term.set_epoch
    term.set_epoch = lambda epoch, epochs: (set_epoch(epoch, epochs), seen.append((epoch, epochs, term.ramp)))
    tr.fit(copy.deepcopy(qstudent), tiny, _cfg(epochs=2), objective, teacher)
    # 64 samples in batches of 32: two steps an epoch, each told the epochs done at its end
    assert seen == [(0.5, 2, 0.25), (1.0, 2, 0.5), (1.5, 2, 0.75), (2.0, 2, 1.0)]


def test_assistants_learn_with_the_runs_method(tiny, teacher, monkeypatch):
    from edgekd.training import loop

    class Opts:
        assistant_epochs, assistants, float_epochs, epochs, lr, qat_lr = 1, ["cnn-student"], 0, 1, 1e-3, None
        batch_size, seed, progress, device, amp, cache, order = 32, 0, False, "cpu", False, True, None
        student = "cnn-student"

    fit, names = loop.fit, []
    monkeypatch.setattr(loop, "fit", lambda model, data, cfg, objective, *a, **k: (
        names.append(objective.name), fit(model, data, cfg, objective, *a, **k))[1])
    monkeypatch.setattr(schemes, "two_phase", lambda run, student, teacher, spec: schemes.Outcome(
        student, None, 0.0, 0.0, 0, 0.0))
    run = schemes.Run(opts=Opts(), data=tiny, spec=None, new_objective=lambda: Objective.single("dkd"),
                      teacher=teacher, log=lambda line: None)
    schemes.assistant(run)
    assert names == ["dkd"]  # not hinton: Mirzadeh et al. train every link of the chain with the same loss


def test_progressive_schedule():
    spec = quant.QuantSpec(weight_bits=2, act_bits=2)

    class O:
        bit_schedule = None
    assert schemes.bit_schedule(O(), spec) == [(8, 8), (4, 4), (2, 2)]
    O.bit_schedule = [8]
    assert schemes.bit_schedule(O(), quant.QuantSpec(weight_bits=4, act_bits=4)) == [(8, 8), (4, 4)]


def test_order_resolution():
    assert schemes.resolve_order(None, 3) == "float-first"
    assert schemes.resolve_order(None, 0) == "joint"
    with pytest.raises(UnknownNameError, match="did you mean 'joint'"):
        schemes.resolve_order("jont", 1)


# ---- recipes -------------------------------------------------------------------------------------

RECIPE = """
scheme = "offline"
order = "float-first"

[[loss]]
name = "ce"

[[loss]]
name = "dkd"
beta = 4.0

[[loss]]
name = "at"
weight = 500.0
student = ["5"]
teacher = ["3.relu"]
"""


def test_recipe_parses_into_options_and_terms():
    options, terms = parse_recipe(RECIPE)
    assert options == {"scheme": "offline", "order": "float-first"}
    objective = Objective.from_specs(terms)
    assert [(n, w) for n, w, _ in objective.terms] == [("ce", 1.0), ("dkd", 1.0), ("at", 500.0)]
    assert objective.terms[1][2].beta == 4.0 and objective.terms[1][2].alpha == 1.0


@pytest.mark.parametrize("text, fragment", [
    ("epocs = 3", "unknown key 'epocs' (did you mean 'epochs'"),
    ("[[loss]]\nname = 'dkdd'", "did you mean 'dkd'"),
    ("[[loss]]\nname = 'dkd'\nbetta = 2", "unknown key 'betta' (did you mean 'beta'"),
    ("[[loss]]\nname = 'dkd'\nweigth = 2", "did you mean 'weight'"),
    ("[[loss]]\nweight = 2", "has no 'name'"),
    ("loss = 3", "list of tables"),
    ("order = ", "not valid TOML"),
])
def test_recipe_errors(text, fragment):
    with pytest.raises((ConfigError, UnknownNameError)) as e:
        parse_recipe(text, "r.toml")
    assert fragment in e.value.message


# ---- schemes end to end --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def npz_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("npz") / "tiny.npz"
    s = _split(90, 4)
    np.savez(path, x=s.x[:, 0] - s.x.min(), y=s.y)
    return f"npz:{path}"


@pytest.mark.parametrize("scheme", schemes.SCHEMES.names())
def test_every_scheme_runs_end_to_end(scheme, npz_data, tmp_path, monkeypatch):
    from edgekd import api

    monkeypatch.chdir(tmp_path)
    opts = api.DistillOptions(data=npz_data, weight_bits=4, act_bits=4, epochs=1, float_epochs=0, teacher_epochs=1,
                              batch_size=32, progress=False, scheme=scheme, generations=2, assistants=["mlp-student"],
                              assistant_epochs=1, teacher="mlp-student")
    m = api.distill(opts, out=tmp_path / "run")
    assert m["scheme"] == scheme and 0.0 <= m["student_accuracy"] <= 1.0
    for name in ("student.pt", "recipe.json", "metrics.json", "log.txt"):
        assert (tmp_path / "run" / name).is_file()
    assert api.load_student(tmp_path / "run")[0] is not None


def test_recipe_file_drives_distill(npz_data, tmp_path, monkeypatch):
    from edgekd import api

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.toml").write_text('order = "joint"\n[[loss]]\nname = "ce"\n[[loss]]\nname = "rkd"\n')
    opts = api.DistillOptions(data=npz_data, weight_bits=4, act_bits=4, epochs=1, teacher_epochs=1, batch_size=32,
                              progress=False, config=str(tmp_path / "r.toml"), teacher="mlp-student")
    m = api.distill(opts, out=tmp_path / "run")
    assert m["method"] == "rkd" and m["order"] == "joint" and m["float_epochs"] == 0
    assert m["teacher_cache"] is True  # npz data has no random flips
    assert m["loss"][1]["student"]  # the automatically chosen layers are recorded


def test_fsp_trains_a_first_stage_then_drops_it(npz_data, tmp_path, monkeypatch):
    from edgekd import api

    monkeypatch.chdir(tmp_path)
    opts = api.DistillOptions(data=npz_data, weight_bits=4, act_bits=4, epochs=2, float_epochs=1, teacher_epochs=1,
                              batch_size=32, progress=False, method="fsp", teacher="cnn-teacher")
    m = api.distill(opts, out=tmp_path / "run")
    # FSP alone for 1/8 of the 3 epochs (at least 1), before them; then CE only (RepDistiller's init)
    assert [r["phase"] for r in m["history"]] == ["first stage", "float", "qat", "qat"]
    assert m["loss"][1]["name"] == "fsp" and len(m["loss"][1]["student"]) >= 2  # recorded with its layers


# ---- command line ----------------------------------------------------------------------------------

def _cli(*args):
    from click.testing import CliRunner

    from edgekd.cli import main

    return CliRunner().invoke(main, ["distill", *map(str, args)])


def test_cli_recipe_with_unknown_key_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[loss]]\nname = 'at'\nstudnet = ['5']\n")
    result = _cli("--config", bad)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "unknown key 'studnet' (did you mean 'student'" in result.stderr


def test_cli_unknown_method_and_param(tmp_path):
    result = _cli("--method", "dkdd")
    assert result.exit_code == 2 and "did you mean 'dkd'" in result.stderr
    result = _cli("--method", "dkd", "--param", "betta=2")
    assert result.exit_code == 2 and "did you mean 'beta'" in result.stderr


def test_cli_lists_layers():
    result = _cli("--list-layers", "--bits", "4")
    assert result.exit_code == 0, result.output
    assert "student layers:" in result.output and "teacher layers:" in result.output
    student = result.output.split("teacher layers:")[0]
    assert " 5 " in student and " 1 " not in student  # BN '1' merges away in the quantized student


def test_help_names_every_method_and_scheme():
    text = " ".join(_cli("--help").output.split())
    for name in LOSSES.names() + schemes.SCHEMES.names():
        assert name in text, name
