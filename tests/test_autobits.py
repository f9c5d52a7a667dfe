"""Automatic per-layer bits (#22): ``distill --bits auto --budget size=SIZE`` (quant.autobits,
config.budget). The knapsack against brute force, the budget's parsing, the plan on a tiny model,
one end-to-end run on digits (recorded, within budget, exported with parity 1.0), and every bad
input as one line, exit 2, before any training and with nothing written.
"""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from click.testing import CliRunner

from edgekd import api, catalog, quant
from edgekd.cli import main
from edgekd.config import budget as bud, layerbits as rules
from edgekd.core.errors import ConfigError
from edgekd.quant import autobits, layerbits, sensitivity
from tests.test_bad_input import assert_user_error, snapshot
from tests.test_layer_bits import SPEC, tiny_dw

TINY = ["--student", SPEC, "--method", "none", "--target", "rpi", "--train-limit", 128]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---- the knapsack --------------------------------------------------------------------------------

def _brute(options, capacity):
    best = None
    for picks in itertools.product(*[range(len(g)) for g in options]):
        size = sum(options[g][k][0] for g, k in enumerate(picks))
        cost = sum(options[g][k][1] for g, k in enumerate(picks))
        if size <= capacity and (best is None or cost < best):
            best = cost
    return best


def _cost(options, picks):
    return sum(options[g][k][1] for g, k in enumerate(picks)), sum(options[g][k][0] for g, k in enumerate(picks))


@pytest.mark.parametrize("seed", range(40))
def test_assign_matches_brute_force(seed):
    rng = random.Random(seed)
    widths = rng.choice([(8, 4, 2), (8, 7, 6, 5, 4, 3, 2), (8, 2)])
    params = [rng.randint(1, 300) for _ in range(rng.randint(1, 5))]
    options = [[(-(-p * b // 8), rng.random() * 4.0 ** (8 - b)) for b in widths] for p in params]
    low, high = sum(min(s for s, _ in g) for g in options), sum(max(s for s, _ in g) for g in options)
    capacity = rng.randint(low, high)
    picks, exact = autobits.assign(options, capacity)
    cost, size = _cost(options, picks)
    assert exact and size <= capacity and cost == pytest.approx(_brute(options, capacity), rel=1e-12)


def test_assign_prefers_the_first_of_equal_costs_and_refuses_what_cannot_fit():
    assert autobits.assign([[(8, 0.0), (4, 0.0)]], 8)[0] == [0]  # widest first: ties keep more bits
    with pytest.raises(ValueError, match="no choice fits"):
        autobits.assign([[(8, 1.0), (4, 2.0)], [(8, 1.0), (4, 2.0)]], 7)
    assert autobits.assign([[(8, float("inf")), (4, 1.0)]], 8)[0] == [1]  # a non-finite error is the last resort


def test_grouped_bytes_never_exceed_the_budget(monkeypatch):
    monkeypatch.setattr(autobits, "MAX_STEPS", 64)
    rng = random.Random(1)
    options = [[(-(-p * b // 8), 4.0 ** (8 - b) * rng.random()) for b in (8, 6, 4, 2)]
               for p in [rng.randint(500, 5000) for _ in range(5)]]
    capacity = sum(g[1][0] for g in options)  # all at 6 bits fits exactly
    picks, exact = autobits.assign(options, capacity)
    cost, size = _cost(options, picks)
    assert not exact and size <= capacity and cost <= _cost(options, [2] * 5)[0]


# ---- the budget ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, size", [("size=20KB", 20_000), ("size=1.5MB", 1_500_000), ("size=512KiB", 524_288),
                                        ("size = 2 mb", 2_000_000), ("SIZE=100B", 100), ("size=.5KB", 500)])
def test_budget_sizes(text, size):
    assert bud.parse(text).size_bytes == size


@pytest.mark.parametrize("text, fragment", [
    ("size=20", "SIZE must be a positive number with a unit B, KB, MB, GB, KiB, MiB or GiB, no unit"),
    ("size=20QB", "unknown unit 'QB'"), ("size=-1KB", "got '-1KB'"), ("size=nanKB", "got 'nanKB'"),
    ("size=1e3KB", "got '1e3KB'"), ("size=0KB", "SIZE must be between 1 B and 1000 GB, got 0KB"),
    ("size=2000GB", "SIZE must be between 1 B and 1000 GB"), ("siz=1KB", "expected size=SIZE (did you mean 'size'?)"),
    ("20KB", "expected size=SIZE"), ("", "--budget must be size=SIZE"), ("size=1KB,size=2KB", "gives size twice"),
    ("latency=5ms", "--budget latency= is not supported: on int8 runtimes (ONNX Runtime, TensorRT) weights of 2 to 8 "
                    "bits all run on the same int8 kernels"),
    ("size=1KB,latency=5", "the choice of bits does not change latency"),
])
def test_bad_budgets_are_one_line(text, fragment):
    with pytest.raises(ConfigError) as e:
        bud.parse(text)
    assert fragment in e.value.one_line() and "\n" not in e.value.one_line()


def test_profile_budgets():
    b = bud.from_profile("pynq-z2")
    assert b.size_bytes == 300_000 and b.label == "the size budget of profile pynq-z2 (size_mb = 0.3)"


# ---- the plan and the chosen spec ------------------------------------------------------------------------

def _spec(first_last=8, layer_bits=()):
    return quant.QuantSpec(weight_bits=8, act_bits=8, first_last_bits=first_last, layer_bits=layer_bits)


def test_layers_fixed_by_first_last_and_rules():
    layers = autobits.layers_of(tiny_dw(), _spec(layer_bits=("depthwise=W8A4", "6=A4")))
    assert [(x.name, x.params, x.fixed) for x in layers] == [
        ("0", 108, 8), ("3", 108, 8), ("6", 288, None), ("9", 216, 8), ("12", 576, None), ("17", 240, 8)]
    assert all(x.fixed is None for x in autobits.layers_of(tiny_dw(), _spec(first_last="same")))
    assert autobits.widths(catalog.load_target("cpu")) == (2, 3, 4, 5, 6, 7)  # reduce_range: at most 7
    assert autobits.widths(catalog.load_target("jetson")) == (2, 3, 4, 5, 6, 7, 8)


def test_chosen_spec_names_layers_by_escaped_path():
    spec = autobits.chosen_spec(_spec(layer_bits=("last=A8",)), {"conv": 4, "a*b": 2, "x,y": 8, "3": 2})
    assert spec.weight_bits == 2 and [r.text for r in spec.layer_bits] == ["[c]onv=W4", "x?y=W8", "last=A8"]
    for r in spec.layer_bits[:2]:  # what recipe.json records reads back as the same rule
        assert rules.parse_text(r.text) == r
    assert rules.escape("a*b[1]?") == "a[*]b[[]1][?]"
    found = layerbits.resolve([("conv", torch.nn.Conv2d(1, 1, 1)), ("convx", torch.nn.Conv2d(1, 1, 1))],
                              spec.layer_bits[:1], 2)
    assert (found["conv"]["weight"], found["convx"]["weight"]) == (4, 2)


def test_weight_noise_falls_with_bits():
    torch.manual_seed(0)
    noise = sensitivity.weight_noise(tiny_dw().eval(), _spec(), (2, 4, 8), ["3", "12"], torch.randn(32, 1, 8, 8))
    assert set(noise) == {"3", "12"} and all(n[2] > n[4] > n[8] > 0 for n in noise.values())


class _Run:
    def __init__(self):
        self.opts, self.lines, self.data = api.DistillOptions(), [], None

    def log(self, line):
        self.lines.append(line)


def test_a_budget_above_the_widest_size_keeps_8_bits_and_says_so():
    auto = autobits.plan(tiny_dw(), _spec(), catalog.load_target("rpi"), bud.parse("size=2KB"), api.DistillOptions())
    assert auto.ample and "the budget holds every layer at W8: all keep W8, nothing to choose" in auto.notes()[0]
    r = _Run()
    spec = auto.choose(r, tiny_dw(), _spec())  # nothing measured: no data needed
    assert spec.weight_bits == 8 and spec.layer_bits == () and auto.record["measured"] is False
    assert auto.record["size_bytes"] == 1536 and r.opts.epochs == 4  # QAT epochs of 8-bit weights
    assert r.lines[0].startswith("auto bits: 1.54 KB of 2 KB")


def test_an_int8_target_is_said_to_store_int8():
    auto = autobits.plan(tiny_dw(), _spec(), catalog.load_target("rpi"), bud.parse("size=1KB"), api.DistillOptions())
    assert "onnxruntime-arm stores every weight as int8 (qdq)" in auto.notes()[1]
    fpga = autobits.plan(tiny_dw(), _spec(), catalog.load_target("fpga"), bud.parse("size=1KB"), api.DistillOptions())
    assert len(fpga.notes()) == 1


# ---- end to end ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    torch.manual_seed(0)
    result = run("distill", *TINY, "--bits", "auto", "--budget", "size=1KB", "--float-epochs", 1, "--epochs", 1,
                 "--out", root / "run", "-q")
    assert result.exit_code == 0, result.output
    return root


def test_auto_bits_respect_the_budget_and_are_recorded(auto_run):
    rec = json.loads((auto_run / "run" / "recipe.json").read_text())
    auto = rec["auto_bits"]
    assert auto["budget"] == {"size_bytes": 1000, "text": "size=1KB", "from": "--budget size=1KB"}
    assert auto["measured"] and auto["size_bytes"] <= 1000 and auto["smallest_bytes"] == 645
    assert auto["size_bytes"] == sum(r["bytes"] for r in auto["layers"])
    assert [r["name"] for r in auto["layers"] if r["fixed"]] == ["0", "17"]
    for r in auto["layers"]:
        assert r["bytes"] == -(-r["params"] * r["bits"] // 8)
        if not r["fixed"]:
            assert set(r["sensitivity_db"]) == {str(b) for b in range(2, 9)} and r["chosen_db"] is not None
    chosen = {r["name"]: r["bits"] for r in auto["layers"]}
    assert {r["name"]: r["weight_bits"] for r in rec["layers"]} == chosen  # the QAT model has them
    assert rec["weight_bits"] == min(chosen.values()) and rec["auto_bits"] and rec["epochs"] == 1
    metrics = json.loads((auto_run / "run" / "metrics.json").read_text())
    assert metrics["layer_bits"] == rec["layer_bits"] and metrics["weight_bits"] == rec["weight_bits"]
    log = (auto_run / "run" / "log.txt").read_text()
    assert "auto bits: --budget size=1KB: 1 KB of weights packed at their bit widths" in log
    assert f"auto bits: {bud.human(auto['size_bytes'])} of 1 KB (--budget size=1KB)" in log


def test_auto_run_exports_with_parity_1_and_retrains_as_layer_bits(auto_run, tmp_path):
    from edgekd.pipeline.deploy import retrain_command

    result = run("export", auto_run / "run", "--target", "rpi", "--student", SPEC, "--out", tmp_path / "b", "-q")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["parity"]["top1_agreement"] == 1.0 and manifest["parity"]["max_abs_diff"] < 1e-5
    rec = json.loads((auto_run / "run" / "recipe.json").read_text())
    assert [r["weight_bits"] for r in manifest["layers"]] == [r["bits"] for r in rec["auto_bits"]["layers"]]
    line = retrain_command(auto_run / "run", "fpga")
    assert f"--weight-bits {rec['weight_bits']} --act-bits 8" in line
    assert all(f"--layer-bits '{r}'" in line for r in rec["layer_bits"])


def test_a_recipe_asks_auto_bits_for_given_float_weights(auto_run, tmp_path):
    """--float-epochs 0 with --student ARCH=FLOAT.pt: the sensitivities are measured on those weights."""
    (tmp_path / "r.toml").write_text('auto_bits = true\nbudget = "size=900B"\n')
    result = run("distill", "--student", f"{SPEC}={auto_run / 'run' / 'float.pt'}", "--method", "none", "--target",
                 "rpi", "--train-limit", 64, "--float-epochs", 0, "--epochs", 1, "--config", tmp_path / "r.toml",
                 "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "float student (from its weights) test accuracy" in result.stderr
    auto = json.loads((tmp_path / "run" / "recipe.json").read_text())["auto_bits"]
    assert auto["measured"] and 645 <= auto["size_bytes"] <= 900


# ---- bad input: one line, exit 2, nothing trained or written ----------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["--bits", "auto", "--budget", "size=100B"], "--budget size=100B cannot be met: the student's 6 Conv / Linear "
     "layers take at least 645 B with every chosen layer at W2, 2 of them fixed by --first-last-bits or --layer-bits "
     "at 348 B; raise the budget, let --bits auto choose the first and last layers too with --first-last-bits same"),
    (["--bits", "auto", "--budget", "size=200B", "--first-last-bits", "same"], "take at least 384 B"),
    (["--budget", "size=1KB"], "--budget sets the size budget of --bits auto, which was not asked; add --bits auto"),
    (["--bits", 4, "--profile", "rpi5"], "--profile sets the size budget of --bits auto"),
    (["--bits", "auto"], "--bits auto needs a budget to choose bits under; add --budget size=SIZE"),
    (["--bits", "auto", "--budget", "size=1KB", "--profile", "rpi5"], "from --budget or from --profile, not both"),
    (["--bits", "auto", "--budget", "latency=5ms"], "--budget latency= is not supported"),
    (["--bits", "auto", "--budget", "size=20QB"], "unknown unit 'QB'"),
    (["--bits", "auto", "--budget", "speed=2"], "--budget 'speed=2': expected size=SIZE"),
    (["--bits", "auto", "--profile", "nosuch"], "unknown profile 'nosuch'"),
    (["--bits", "auto", "--weight-bits", 4, "--budget", "size=1KB"], "--bits auto chooses the weight bits"),
    (["--bits", "auto", "--budget", "size=1KB", "--scheme", "progressive"], "--bits auto chooses bits once"),
    (["--bits", "auto", "--budget", "size=1KB", "--float-epochs", 0],
     "--bits auto measures each layer's sensitivity on the trained float student"),
    (["--bits", "auto", "--budget", "size=1KB", "--order", "joint"], "no float phase, no weights"),
    (["--bits", "aut"], "--bits must be an integer between 2 and 8 or 'auto', got 'aut'"),
    (["--bits", "auto", "--budget", "size=1KB", "--act-bits", 9], "--act-bits must be between 2 and 8, got 9"),
])
def test_distill_refuses_bad_auto_bits_before_training(tmp_path, monkeypatch, args, fragment):
    import edgekd.training.loop as loop

    monkeypatch.setattr(loop, "fit", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert_user_error(run("distill", *TINY, *args, "--out", tmp_path / "r"), fragment)
    assert snapshot(tmp_path) == before


def test_recipes_and_the_api_take_auto_bits(tmp_path, monkeypatch):
    import edgekd.training.loop as loop

    monkeypatch.setattr(loop, "fit", lambda *a, **k: pytest.fail("trained"))
    (tmp_path / "r.toml").write_text('auto_bits = true\nbudget = "size=1QB"\n')
    with pytest.raises(ConfigError, match="unknown unit 'QB'"):
        api.distill(api.DistillOptions(config=str(tmp_path / "r.toml"), student=SPEC, method="none"),
                    out=tmp_path / "a")
    with pytest.raises(ConfigError, match="weight bits 4 were also given"):
        api.distill(api.DistillOptions(auto_bits=True, budget="size=1KB", weight_bits=4, student=SPEC, method="none",
                                       target="rpi"), out=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_only_distill_takes_auto(tmp_path):
    result = run("quantize", tmp_path, "--bits", "auto")
    assert result.exit_code == 2 and "'auto' is not a valid integer" in result.output
