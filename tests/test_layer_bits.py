"""Per-layer bits (#22): ``--layer-bits PATTERN=WxAy`` and recipe ``[[bits]]`` tables, applied in the
Brevitas surgery, recorded in recipe.json / metrics / the manifest, rebuilt when export reloads the
run, exported with parity 1.0, checked by ``edgekd check``; every bad input one line, exit 2.

The model is a tiny depthwise-separable ReLU network (``tests.test_layer_bits:tiny_dw``), trained
for one float and one QAT epoch on digits (a few seconds).
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from edgekd import api, catalog, quant
from edgekd.cli import main
from edgekd.config import recipe
from edgekd.core.errors import ConfigError
from edgekd.quant import layerbits
from tests.test_bad_input import assert_user_error, snapshot

SPEC = "tests.test_layer_bits:tiny_dw"


def _ds(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def tiny_dw(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """conv 3x3 -> [depthwise 3x3 -> pointwise 1x1] x 2 -> pool -> linear (ReLU, no SE)."""
    return nn.Sequential(nn.Conv2d(in_channels, 12, 3, 1, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
                         *_ds(12, 24, 2), *_ds(24, 24, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(24, num_classes))


LAYERS = ["0", "3", "6", "9", "12", "17"]  # conv, dw, pw, dw, pw, linear


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """W2A2 with depthwise layers at W8A8 and the last layer's input at 8 bits, target rpi (no
    reduce_range: 8-bit weights stay 8), one float and one QAT epoch on digits."""
    root = tmp_path_factory.mktemp("mixed")
    torch.manual_seed(0)
    result = run("distill", "--student", SPEC, "--method", "none", "--bits", 2, "--target", "rpi",
                 "--layer-bits", "depthwise=W8A8", "--layer-bits", "last=A8", "--epochs", 1, "--float-epochs", 1,
                 "--out", root / "run", "-q")
    assert result.exit_code == 0, result.output
    return root


# ---- parsing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, rule", [
    ("depthwise=W8A8", layerbits.LayerRule(type=("depthwise",), weight=8, act=8)),
    ("features.3.*=W4", layerbits.LayerRule(layers=("features.3.*",), weight=4)),
    ("last=a8", layerbits.LayerRule(type=("last",), act=8)),
    ("first, last=w8", layerbits.LayerRule(type=("first", "last"), weight=8)),
    ("3,conv=W6A4", layerbits.LayerRule(layers=("3",), type=("conv",), weight=6, act=4)),
])
def test_layer_bits_text_parses(text, rule):
    assert layerbits.parse_text(text) == rule
    assert layerbits.parse_text(rule.text) == rule  # the recorded spelling reads back


@pytest.mark.parametrize("text, fragment", [
    ("depthwise", "expected PATTERN=WxAy"),
    ("=W8", "expected PATTERN=WxAy"),
    ("depthwise=8", "bits must be W<weight bits>A<activation bits>, W<bits> or A<bits>, got '8'"),
    ("depthwise=W8B2", "got 'W8B2'"),
    ("depthwise=", "got ''"),
    ("depthwise=W9", "weight bits must be between 2 and 8, got 9"),
    ("depthwise=W8A1", "activation bits must be between 2 and 8, got 1"),
    ("a,,b=W8", "empty pattern between commas"),
])
def test_bad_layer_bits_text_is_one_line(text, fragment):
    with pytest.raises(ConfigError, match="--layer-bits") as e:
        layerbits.parse_text(text)
    assert fragment in e.value.one_line() and "\n" not in e.value.one_line()


@pytest.mark.parametrize("table, fragment", [
    ({"type": "depthwise", "wieght": 8}, "unknown key 'wieght' (did you mean 'weight'?)"),
    ({"type": "depthwize", "weight": 8}, "unknown layer type 'depthwize' (did you mean 'depthwise'"),
    ({"type": "depthwise", "layers": "3", "weight": 8}, "give either layers (module-path globs) or type"),
    ({"weight": 8}, "give either layers"),
    ({"type": "depthwise"}, "give weight and/or act bits"),
    ({"layers": "3", "act": 12}, "activation bits must be between 2 and 8, got 12"),
    ({"layers": "3", "weight": "8"}, "weight bits must be an integer between 2 and 8, got '8'"),
    ({"layers": 3, "weight": 8}, "layers must be a non-empty string or a list of them, got 3"),
])
def test_bad_bits_table_is_one_line(table, fragment):
    with pytest.raises(ConfigError) as e:
        layerbits.parse_table(table, "r.toml: bits[0]")
    assert fragment in e.value.one_line() and e.value.one_line().startswith("r.toml: bits[0]")


def test_recipe_bits_tables_become_layer_bits():
    options, _ = recipe.parse('[[bits]]\ntype = "depthwise"\nweight = 8\nact = 8\n\n'
                              '[[bits]]\nlayers = ["3.*", "6"]\nweight = 4\n', "r.toml")
    assert layerbits.rules_from(options["layer_bits"]) == (
        layerbits.LayerRule(type=("depthwise",), weight=8, act=8), layerbits.LayerRule(layers=("3.*", "6"), weight=4))


@pytest.mark.parametrize("text, fragment", [
    ("bits = 4\n", "'bits' must be a list of tables ([[bits]] sections)"),
    ('layer_bits = ["depthwise=W8"]\n[[bits]]\ntype = "last"\nweight = 8\n', "both [[bits]] tables and layer_bits"),
    ('[[bits]]\ntype = "last"\nweigth = 8\n', "r.toml: bits[0]: unknown key 'weigth'"),
    ('layer_bits = ["depthwise=W1"]\n', "r.toml: layer_bits 'depthwise=W1': weight bits must be between 2 and 8"),
])
def test_bad_recipe_bits(text, fragment):
    with pytest.raises(ConfigError) as e:
        recipe.parse(text, "r.toml")
    assert fragment in e.value.one_line()


# ---- resolving and the quantized model ------------------------------------------------------------

def _resolved(*rules, weight=2, first_last=None):
    gm = quant.trace(tiny_dw())
    return layerbits.resolve(layerbits.compute_layers(gm), layerbits.rules_from(list(rules)), weight, first_last)


def test_later_rules_win_and_globs_match_modules_below():
    r = _resolved("conv=W4", "depthwise=W8A8", "3=W6", "last=A8", first_last={"0": 8, "17": 8})
    assert {k: (v["weight"], v["act"]) for k, v in r.items()} == {
        "0": (4, None), "3": (6, 8), "6": (4, None), "9": (8, 8), "12": (4, None), "17": (8, 8)}
    assert _resolved("1*=W8")["12"]["weight"] == 8 and _resolved("1*=W8")["6"]["weight"] == 2


def test_a_pattern_naming_no_layer_is_an_error_listing_layers():
    with pytest.raises(ConfigError) as e:
        _resolved("depthwise=W8", "features.*=W4")
    line = e.value.one_line()
    assert "--layer-bits pattern 'features.*' matches no Conv or Linear layer" in line
    assert "its layers: 0, 3, 6, 9, 12, 17" in line
    with pytest.raises(ConfigError, match=r"matches no Conv or Linear layer of the student \(did you mean 'depthwise'"):
        _resolved("depthwize=W8")  # a misspelt type reads as a glob


def test_quantized_model_has_the_resolved_bits():
    spec = quant.QuantSpec(weight_bits=2, act_bits=2, layer_bits=("depthwise=W8A8", "6=A4", "last=W6"))
    q = quant.quantize(tiny_dw(), spec)
    quant.materialize(q, (1, 8, 8))
    table = {r["name"]: (r["type"], r["weight_bits"], r["act_bits"]) for r in layerbits.table(q)}
    assert table == {"0": ("conv", 8, 8), "3": ("depthwise", 8, 8), "6": ("pointwise", 2, 4),
                     "9": ("depthwise", 8, 8), "12": ("pointwise", 2, 2), "17": ("linear", 6, 2)}
    assert q.edgekd_act_orphans == []


def test_no_rules_leave_the_model_as_before():
    """Without rules the first/last rule and every quantizer are those of a spec without the field."""
    a = quant.quantize(tiny_dw(), quant.QuantSpec(weight_bits=4, act_bits=4))
    b = quant.quantize(tiny_dw(), quant.QuantSpec(weight_bits=4, act_bits=4, layer_bits=()))
    assert [r["weight_bits"] for r in layerbits.table(a)] == [8, 4, 4, 4, 4, 8] and quant.describe(a) == quant.describe(b)


def test_first_and_last_layers_are_found_by_path():
    """The stem (12, 1, 3, 3) is shaped like the first depthwise layer: found by shape (runs written
    before per-layer bits) it stayed at the low bits; by path it gets the first/last bits."""
    by_path = quant.quantize(tiny_dw(), quant.QuantSpec(weight_bits=2, act_bits=2))
    by_shape = quant.quantize(tiny_dw(), quant.QuantSpec(weight_bits=2, act_bits=2, first_last_by="shape"))
    assert [r["weight_bits"] for r in layerbits.table(by_path)] == [8, 2, 2, 2, 2, 8]
    assert [r["weight_bits"] for r in layerbits.table(by_shape)] == [2, 2, 2, 2, 2, 8]


def test_a_run_written_before_per_layer_bits_reloads_as_trained(mixed_run, tmp_path):
    import shutil

    from edgekd import models
    from edgekd.pipeline.distill import load_student

    shutil.copytree(mixed_run / "run", tmp_path / "old")
    ckpt = models.load_checkpoint(tmp_path / "old" / "student.pt")
    ckpt["meta"]["quant"] = {k: v for k, v in ckpt["meta"]["quant"].items() if k not in ("layer_bits", "first_last_by")}
    models.save_checkpoint(tmp_path / "old" / "student.pt", ckpt["state_dict"], ckpt["meta"])
    q, _ = load_student(tmp_path / "old", SPEC)
    assert q.edgekd_spec.first_last_by == "shape" and q.edgekd_spec.layer_bits == ()
    assert [r["weight_bits"] for r in layerbits.table(q)] == [2, 2, 2, 2, 2, 8]


def test_spec_round_trips_through_checkpoint_metadata():
    spec = quant.QuantSpec(weight_bits=2, act_bits=2, layer_bits=("depthwise=W8A8", "3.*=W4"))
    stored = json.loads(json.dumps(spec.to_dict()))
    assert stored["layer_bits"] == [{"type": ["depthwise"], "weight": 8, "act": 8}, {"layers": ["3.*"], "weight": 4}]
    assert quant.QuantSpec(**stored) == spec
    old = {k: v for k, v in spec.to_dict().items() if k != "layer_bits"}  # a checkpoint from before the field
    assert quant.QuantSpec(**old).layer_bits == ()


def test_reduce_range_targets_cap_layer_weights_at_7():
    spec = quant.spec_for_target(catalog.load_target("cpu"), 2, 2, layer_bits=["depthwise=W8A8", "last=W4"])
    assert [r.text for r in spec.layer_bits] == ["depthwise=W7A8", "last=W4"]
    spec = quant.spec_for_target(catalog.load_target("rpi"), 2, 2, layer_bits=["depthwise=W8A8"])
    assert [r.text for r in spec.layer_bits] == ["depthwise=W8A8"]


# ---- preflight: which mixed widths a target takes ------------------------------------------------------

def test_preflight_says_which_mixed_widths_run_and_which_are_accelerated():
    cpu = {f["code"]: f for f in catalog.preflight("rpi", 2, 2, ["depthwise=W8A8"])}
    assert "weights at 2,8 bits: accelerated 8; 2 run on 8-bit kernels" in cpu["mixed_bits"]["message"]
    fpga = {f["code"]: f for f in catalog.preflight("fpga", 2, 2, ["depthwise=W8A8"])}
    assert "weights at 2,8 bits: accelerated 2,8" in fpga["mixed_bits"]["message"]
    trt = catalog.preflight("jetson", 8, 8, ["depthwise=W4A2"])
    assert trt[0]["level"] == "error" and trt[0]["code"] == "layer_act_bits_not_accepted"
    assert "--layer-bits depthwise=W4A2" in trt[0]["message"]


def test_check_cli_takes_layer_bits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ok = run("check", "--target", "rpi", "--bits", 2, "--layer-bits", "depthwise=W8A8", "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["layer_bits"] == ["depthwise=W8A8"]
    assert_user_error(run("check", "--target", "jetson", "--layer-bits", "depthwise=W8A2"),
                      "W8A8 cannot be deployed to tensorrt-int8")
    assert_user_error(run("check", "--target", "rpi", "--layer-bits", "depthwise=W9"),
                      "--layer-bits 'depthwise=W9': weight bits must be between 2 and 8, got 9")


# ---- end to end: distill, export (parity 1.0), quantize -----------------------------------------------

def test_distill_records_rules_and_resolved_widths(mixed_run):
    rec = json.loads((mixed_run / "run" / "recipe.json").read_text())
    assert rec["layer_bits"] == ["depthwise=W8A8", "last=A8"]
    assert [(r["name"], r["weight_bits"], r["act_bits"]) for r in rec["layers"]] == [
        ("0", 8, 8), ("3", 8, 8), ("6", 2, 2), ("9", 8, 8), ("12", 2, 2), ("17", 8, 8)]
    metrics = json.loads((mixed_run / "run" / "metrics.json").read_text())
    assert metrics["layer_bits"] == ["depthwise=W8A8", "last=A8"] and metrics["weight_bits"] == 2


@pytest.mark.parametrize("target", ["rpi", "cpu"])
def test_mixed_graph_exports_with_parity_1(mixed_run, tmp_path, target):
    result = run("export", mixed_run / "run", "--target", target, "--student", SPEC, "--out", tmp_path / "b", "-q")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["parity"]["top1_agreement"] == 1.0 and manifest["parity"]["max_abs_diff"] < 1e-5
    assert manifest["quant"]["layer_bits"] == [{"type": ["depthwise"], "weight": 8, "act": 8},
                                               {"type": ["last"], "act": 8}]
    assert [(r["name"], r["weight_bits"], r["act_bits"]) for r in manifest["layers"]][1:3] == [("3", 8, 8), ("6", 2, 2)]
    if manifest["backend"] == "onnxruntime":
        assert manifest["fusion"]["float_compute"] == 0  # every layer, 2- or 8-bit, on int8 kernels


def test_mixed_qonnx_graph_for_finn_matches_exactly(tmp_path):
    pytest.importorskip("qonnx")
    torch.manual_seed(0)
    result = run("distill", "--student", SPEC, "--method", "none", "--bits", 2, "--target", "fpga",
                 "--layer-bits", "depthwise=W8A8", "--layer-bits", "6=W4", "--epochs", 1, "--float-epochs", 1,
                 "--out", tmp_path / "run", "-q")
    assert result.exit_code == 0, result.output
    result = run("export", tmp_path / "run", "--target", "fpga", "--student", SPEC, "--out", tmp_path / "b", "-q")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["parity"]["top1_agreement"] == 1.0 and manifest["parity"]["max_abs_diff"] == 0.0
    assert [r["weight_bits"] for r in manifest["layers"]] == [8, 8, 4, 8, 2, 8]


def test_quantize_cli_takes_layer_bits(mixed_run, tmp_path):
    result = run("quantize", mixed_run / "run", "--bits", 4, "--target", "rpi", "--layer-bits", "pointwise=W8", "--trust-code",
                 "--out", tmp_path / "ptq", "-q")
    assert result.exit_code == 0, result.output
    rec = json.loads((tmp_path / "ptq" / "recipe.json").read_text())
    assert rec["layer_bits"] == ["pointwise=W8"]
    assert [r["weight_bits"] for r in rec["layers"]] == [8, 4, 8, 4, 8, 8]


def test_recipe_rules_come_before_command_line_rules(tmp_path):
    from edgekd.pipeline.distill import with_recipe

    (tmp_path / "r.toml").write_text('[[bits]]\ntype = "depthwise"\nweight = 4\n')
    opts = with_recipe(api.DistillOptions(config=str(tmp_path / "r.toml"), layer_bits=["depthwise=W8"]))
    assert opts.layer_bits == [{"type": "depthwise", "weight": 4}, "depthwise=W8"]
    assert with_recipe(api.DistillOptions(config=str(tmp_path / "r.toml"))).layer_bits == [
        {"type": "depthwise", "weight": 4}]


@pytest.mark.parametrize("args, fragment", [
    (["--layer-bits", "features.*=W8"], "--layer-bits pattern 'features.*' matches no Conv or Linear layer of the "
                                        "student; its layers: 0, 3, 6, 9, 12, 17"),
    (["--layer-bits", "depthwise"], "--layer-bits 'depthwise': expected PATTERN=WxAy"),
    (["--layer-bits", "depthwise=W8A9"], "activation bits must be between 2 and 8, got 9"),
    (["--target", "jetson", "--bits", 8, "--layer-bits", "depthwise=A4"],
     "tensorrt-int8 does not accept 4-bit activations, asked by --layer-bits depthwise=A4"),
])
def test_distill_refuses_bad_layer_bits_before_training(tmp_path, monkeypatch, args, fragment):
    import edgekd.training.loop as loop

    monkeypatch.setattr(loop, "fit", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    result = run("distill", "--student", SPEC, "--method", "none", "--bits", 2, *args, "--out", tmp_path / "r")
    assert_user_error(result, fragment)
    assert snapshot(tmp_path) == before


def test_sweep_refuses_a_bad_rule_before_any_cell(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert_user_error(run("sweep", "--bits", 2, "--layer-bits", "depthwise=W8A", "--out", tmp_path / "s"),
                      "--layer-bits 'depthwise=W8A': bits must be")
    assert snapshot(tmp_path) == before


def test_sweep_records_its_layer_bits():
    from edgekd.pipeline.sweep import SweepOptions

    assert SweepOptions(layer_bits=("depthwise=W8A8",)).recipe()["layer_bits"] == ["depthwise=W8A8"]
    assert SweepOptions().recipe()["layer_bits"] is None  # a root made before the option resumes


def test_retrain_command_keeps_the_layer_bits(tmp_path):
    from edgekd.pipeline.deploy import retrain_command

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.json").write_text(json.dumps({"student": "x", "weight_bits": 2, "act_bits": 2,
                                                              "layer_bits": ["depthwise=W8A8", "3.*=W4"]}))
    line = retrain_command(tmp_path / "run", "jetson")
    assert "--weight-bits 2 --act-bits 2 --layer-bits 'depthwise=W8A8' --layer-bits '3.*=W4' --target jetson" in line


def test_rules_and_preflight_need_no_torch():
    """``edgekd check --layer-bits`` runs where only numpy and a runtime are installed."""
    import subprocess
    import sys

    code = ("import sys; from edgekd import catalog; from edgekd.config import recipe; "
            "catalog.preflight('rpi', 2, 2, ['depthwise=W8A8']); recipe.parse('[[bits]]\\ntype = \"last\"\\nweight = 8\\n'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
