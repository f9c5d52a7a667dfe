"""``edgekd explain`` (#22): per quantized layer, the SQNR between the float and the fake-quant
student (that layer alone, and the whole model) and between the fake-quant student and ONNX Runtime
at the layer's requantized output; worst first, as a table, JSON and a PNG.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from edgekd import quant
from edgekd.cli import main
from edgekd.data import load_dataset
from edgekd.quant import sensitivity
from edgekd.quant.ptq import post_training_quantize
from tests.test_bad_input import assert_user_error, snapshot

SPEC = "tests.test_layer_bits:tiny_dw"
LAPLACE = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def high_pass_depthwise(num_classes: int = 10) -> nn.Module:
    """conv -> [depthwise 3x3 -> pointwise 1x1] x 2 -> pool -> linear, whose depthwise filters are
    high-pass (Laplacian, as edge detectors in trained depthwise layers are) and whose pointwise
    layers average their inputs. At 2 bits a Laplacian keeps its centre tap only (the best
    threshold rounds the -1 taps to 0) and the difference of 2-bit inputs is mostly rounding noise:
    the depthwise layers are where quantization breaks this model."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, 2, 1, groups=16), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
    with torch.no_grad():
        for i in (2, 6):
            c = m[i].out_channels
            m[i].weight.copy_(LAPLACE.expand(c, 1, 3, 3) * (1 + 0.2 * torch.rand(c, 1, 1, 1)))
            m[i].bias.fill_(0.5)
        for i in (4, 8):
            m[i].weight.uniform_(0.5, 1.0)
            m[i].weight /= m[i].in_channels
            m[i].bias.zero_()
        m[0].weight.abs_()
    return m.eval()


def _ranked(rules=(), act_bits: int = 2):
    x = torch.from_numpy(load_dataset("digits").train.take(np.arange(256)))
    spec = quant.QuantSpec(weight_bits=2, act_bits=act_bits, layer_bits=rules)
    q = post_training_quantize(high_pass_depthwise(), spec, x, bias_correction=False)
    rows, extra = sensitivity.layer_errors(q, x[:128])
    return sensitivity.worst_first(rows), extra


def test_depthwise_layers_rank_worst_at_uniform_2_bits():
    rows, extra = _ranked()
    assert [r["type"] for r in rows[:2]] == ["depthwise", "depthwise"]
    assert all(r["weight_bits"] == 2 and r["act_bits"] == 2 for r in rows[:2])
    assert all(rows[i]["logits_db"] <= rows[i + 1]["logits_db"] for i in range(len(rows) - 1))
    assert rows[0]["weights_db"] < 0  # the filter no longer is a Laplacian: error above signal
    assert 0 <= extra["logits"]["top1_agreement"] <= 1
    fixed, _ = _ranked(("depthwise=W8A8",))  # the remedy explain points to
    assert "depthwise" not in [r["type"] for r in fixed[:3]]
    assert all(r["isolated_db"] > 30 for r in fixed if r["type"] == "depthwise")


def test_sqnr():
    assert sensitivity.sqnr([1.0, 2.0], [1.0, 2.0]) is None  # exact
    assert sensitivity.sqnr([1.0, 1.0], [1.1, 0.9]) == pytest.approx(20.0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A W2A2 tiny depthwise student with its depthwise layers at W8A8 (1 float + 1 QAT epoch on
    digits), exported for onnxruntime-arm."""
    return distill_export(tmp_path_factory.mktemp("explain"), "rpi", "depthwise=W8A8")


def distill_export(root, target: str, rule: str):
    """``root``/run (W2A2 with ``rule``, 1 float + 1 QAT epoch on digits) and its bundle ``root``/b."""
    torch.manual_seed(0)
    for args in (("distill", "--student", SPEC, "--method", "none", "--bits", 2, "--target", target,
                  "--layer-bits", rule, "--epochs", 1, "--float-epochs", 1, "--out", root / "run"),
                 ("export", root / "run", "--target", target, "--student", SPEC, "--out", root / "b")):
        result = run(*args, "-q")
        assert result.exit_code == 0, result.output
    return root


def test_explain_bundle_table_and_json(bundle):
    result = run("explain", bundle / "b", "--student", SPEC, "-q")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{bundle / 'b'}: W2A2 with depthwise=W8A8, 359 test samples")
    assert lines[0].endswith(" first (--rank auto)")
    assert lines[1].split() == ["layer", "type", "W", "A", "noise", "%", "raise", "B", "%/KiB", "raise", "gain", "dB",
                                "logits", "dB", "layer", "dB", "weights", "dB", "inputs", "dB", "cumulative", "dB",
                                "runtime", "dB"]
    table = [line.split() for line in lines[2:8]]
    assert sorted(r[0] for r in table) == ["0", "12", "17", "3", "6", "9"]
    # the runtime computes what PyTorch does: bit-identical, or a value at a rounding tie one level off (the int32
    # accumulator against PyTorch's float one; > 60 dB)
    assert all(r[-1] == "exact" or float(r[-1]) > 60 for r in table if r[0] != "17")
    types = [line for line in lines if line.startswith("  ") and "layer(s)  gain" in line]
    assert sorted(line.split()[0] for line in types) == ["conv", "depthwise", "linear", "pointwise"]
    auto = json.loads(run("explain", bundle / "b", "--student", SPEC, "--json", "--samples", 100, "-q").stdout)
    collapsed = auto["logits"]["probe_agreement"] < 0.5
    assert auto["rank_asked"] == "auto" and auto["rank"] == ("bytes" if collapsed else "gain")
    assert sum(r["noise_share"] for r in auto["layers"]) == pytest.approx(1.0)
    data = json.loads(run("explain", bundle / "b", "--student", SPEC, "--json", "--samples", 100, "--rank", "gain",
                          "-q").stdout)
    assert data["samples"] == 100 and data["target"] == "onnxruntime-arm" and data["runtime_note"] is None
    gains = [r["gain_db"] for r in data["layers"]]
    assert data["rank"] == "gain" and gains == sorted(gains, reverse=True)
    per_kb = json.loads(run("explain", bundle / "b", "--student", SPEC, "--json", "--samples", 100, "--rank", "bytes",
                            "-q").stdout)
    priced = [r["share_per_kb"] for r in per_kb["layers"] if r["share_per_kb"] is not None]
    assert per_kb["rank"] == "bytes" and priced == sorted(priced, reverse=True) and priced
    # depthwise=W8A8 on onnxruntime-arm (no reduce_range): those weights are at the raise width, nothing to buy
    assert all(r["raise_bytes"] == 0 and r["share_per_kb"] is None for r in per_kb["layers"] if r["name"] == "3")
    assert data["reference"].startswith("the float student (float.pt)")  # QAT: not its quantizers off
    alone = json.loads(run("explain", bundle / "b", "--student", SPEC, "--json", "--samples", 100, "--rank", "alone",
                           "-q").stdout)
    dbs = [r["logits_db"] for r in alone["layers"]]
    assert dbs == sorted(dbs, key=lambda v: float("inf") if v is None else v)
    compared = [r for r in data["layers"] if r["runtime_compared"]]
    assert len(compared) == 5 and all(r["runtime_levels_off"] < 1e-3 for r in compared)
    assert all(r["runtime_db"] is None or r["runtime_db"] > 60 for r in compared)
    assert {r["name"]: (r["weight_bits"], r["act_bits"]) for r in data["layers"]}["3"] == (8, 8)


def test_explain_run_dir_and_png(bundle, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    args = ["explain", bundle / "run", "--student", SPEC, "--samples", 50, "--png", tmp_path / "layers.png", "-q"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "runtime dB" not in result.stdout and ", 50 test samples" in result.stdout.splitlines()[0]
    assert (tmp_path / "layers.png").read_bytes().startswith(b"\x89PNG")
    again = run(*args)  # edgekd's own plot may be replaced
    assert again.exit_code == 0, again.output


def test_explain_bad_inputs(bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(bundle / "b", tmp_path / "moved")
    manifest = json.loads((tmp_path / "moved" / "manifest.json").read_text())
    manifest["run_dir"] = str(tmp_path / "gone")
    (tmp_path / "moved" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "notes.png").write_text("mine")
    (tmp_path / "empty").mkdir()
    before = snapshot(tmp_path)
    assert_user_error(run("explain", tmp_path / "nothing"), "no such bundle or run")
    assert_user_error(run("explain", tmp_path / "empty"), "is not a run directory")
    assert_user_error(run("explain", bundle / "b", "--samples", 0), "--samples must be an integer between 1 and")
    assert_user_error(run("explain", tmp_path / "moved", "--student", SPEC),
                      f"was exported from run '{tmp_path / 'gone'}', which is not there", "--run DIR")
    assert_user_error(run("explain", bundle / "b", "--png", tmp_path / "notes.png"),
                      "notes.png exists and was not written by edgekd")
    assert snapshot(tmp_path) == before
    ok = run("explain", tmp_path / "moved", "--run", bundle / "run", "--student", SPEC, "--samples", 20, "-q")
    assert ok.exit_code == 0, ok.output


def test_explain_qonnx_bundle_through_qonnx_executor(tmp_path):
    pytest.importorskip("qonnx")
    distill_export(tmp_path, "fpga", "6=W4A4")
    data = json.loads(run("explain", tmp_path / "b", "--student", SPEC, "--json", "--samples", 60, "-q").stdout)
    assert data["target"] == "qonnx-finn" and data["runtime_note"] is None
    compared = [r for r in data["layers"] if r["runtime_compared"]]
    assert len(compared) == 5 and all(r["runtime_db"] is None for r in compared)  # FINN's input: exact
    assert {r["name"]: (r["weight_bits"], r["act_bits"]) for r in data["layers"]}["6"] == (4, 4)


def test_explain_refuses_an_fp32_bundle(bundle, tmp_path):
    result = run("export", bundle / "run", "--target", "rpi", "--float", "--student", SPEC, "--out", tmp_path / "f",
                 "-q")
    assert result.exit_code == 0, result.output
    assert_user_error(run("explain", tmp_path / "f"), "is an fp32 bundle: nothing in it is quantized")


def test_raising_depthwise_gains_most_per_layer_and_per_type():
    rows, extra = _ranked(act_bits=8)  # W2A8: the 2-bit high-pass filters are what breaks
    ranked = sensitivity.most_gain_first(rows)
    assert ranked[0]["name"] == "6" and ranked[0]["gain_db"] > 0.3
    base = extra["logits"]["probe_sqnr_db"]
    for r in rows:  # the gain is the raised model's SQNR over the whole model's (biases in float in both)
        assert r["gain_db"] == pytest.approx(r["raised_db"] - base)
        assert r["params"] == {"0": 72, "2": 72, "4": 128, "6": 144, "8": 256, "12": 160}[r["name"]]
    groups = {g["group"]: g for g in extra["groups"]}
    assert extra["groups"][0]["group"] == "depthwise" and groups["depthwise"]["layers"] == ["2", "6"]
    assert groups["depthwise"]["gain_db"] > 5 > max(g["gain_db"] for g in extra["groups"][1:])
    # only the depthwise layers quantized: below every other type alone (W2A2 too)
    assert groups["depthwise"]["alone_db"] == min(g["alone_db"] for g in extra["groups"])
    _, a2 = _ranked()
    assert {g["group"]: g for g in a2["groups"]}["depthwise"]["alone_db"] == min(g["alone_db"] for g in a2["groups"])
    # at 8 bits the rule recovers most of it (3.2 -> 33.4 dB at the logits) and raising them further to float
    # gains a tenth of what it gains from 2 bits (3.6 dB vs 33.9)
    _, fixed = _ranked(("depthwise=W8A8",), act_bits=8)
    assert fixed["logits"]["probe_sqnr_db"] > base + 25
    assert abs({g["group"]: g for g in fixed["groups"]}["depthwise"]["gain_db"]) < groups["depthwise"]["gain_db"] / 5


def test_noise_shares_and_raise_bytes_against_hand_computed_values():
    rows = [{"name": "dw", "logits_db": 10.0, "params": 9, "weight_bits": 2},  # noise 0.1, 9 B - 3 B
            {"name": "pw", "logits_db": 20.0, "params": 100, "weight_bits": 2},  # noise 0.01, 100 B - 25 B
            {"name": "fc", "logits_db": 13.0, "params": 40, "weight_bits": 8},  # at 8 bits: nothing to buy
            {"name": "ex", "logits_db": None, "params": 16, "weight_bits": 4}]  # exact: no noise, 16 B - 8 B
    groups = [{"group": "depthwise", "layers": ["dw"]}, {"group": "other", "layers": ["pw", "ex"]}]
    sensitivity.add_costs(rows, groups)
    total = 0.1 + 0.01 + 10 ** -1.3
    by = {r["name"]: r for r in rows}
    assert by["dw"]["noise_share"] == pytest.approx(0.1 / total) and by["dw"]["raise_bytes"] == 6
    assert by["dw"]["share_per_kb"] == pytest.approx(0.1 / total / (6 / 1024))
    assert by["pw"]["raise_bytes"] == 75 and by["fc"]["raise_bytes"] == 0 and by["fc"]["share_per_kb"] is None
    assert by["ex"]["noise_share"] == 0.0 and by["ex"]["raise_bytes"] == 8
    assert groups[1]["noise_share"] == pytest.approx(0.01 / total) and groups[1]["raise_bytes"] == 83
    assert [r["name"] for r in sensitivity.best_buy_first(rows)] == ["dw", "pw", "ex", "fc"]
    sensitivity.add_costs(rows, [], raise_bits=7)  # a reduce_range target's widest weights
    assert {r["name"]: r["raise_bytes"] for r in rows} == {"dw": 5, "pw": 63, "fc": 0, "ex": 6}


def test_depthwise_layers_are_the_best_buy_per_byte_at_uniform_2_bits():
    rows, extra = _ranked()
    sensitivity.add_costs(rows, extra["groups"])
    assert [r["type"] for r in sensitivity.best_buy_first(rows)[:2]] == ["depthwise", "depthwise"]
    assert sensitivity.best_buy_first(extra["groups"])[0]["group"] == "depthwise"


def test_auto_rank_is_gain_unless_the_probe_collapsed(bundle, monkeypatch, tmp_path):
    from edgekd.pipeline import explain as ex

    for threshold, expected in ((0.0, "gain"), (1.01, "bytes")):
        monkeypatch.setattr(ex, "COLLAPSED_AGREEMENT", threshold)
        result = ex.explain(bundle / "b", samples=30, student=SPEC)
        assert result["rank"] == expected and result["rank_asked"] == "auto"
        assert (result["caveat"] is None) == (expected == "gain")
        if importlib.util.find_spec("matplotlib"):
            assert ex.plot(result, tmp_path / f"{expected}.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ex.EdgekdError, match="--rank must be one of auto, gain, alone, bytes, got 'worst'"):
        ex.explain(bundle / "b", samples=30, student=SPEC, rank="worst")


def test_gain_ranking_puts_an_exact_raise_first_and_unknown_last():
    rows = [{"name": "a", "raised_db": 3.0, "gain_db": 1.0}, {"name": "b", "raised_db": None, "gain_db": None},
            {"name": "c", "raised_db": 9.0, "gain_db": 7.0}, {"name": "d", "raised_db": 1.0, "gain_db": None}]
    assert [r["name"] for r in sensitivity.most_gain_first(rows)] == ["b", "c", "a", "d"]


def test_explain_says_when_a_run_has_no_float_student(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    result = run("distill", "--student", SPEC, "--method", "none", "--bits", 4, "--epochs", 1, "--float-epochs", 0,
                 "--out", tmp_path / "run", "-q")
    assert result.exit_code == 0, result.output
    out = run("explain", tmp_path / "run", "--student", SPEC, "--samples", 40, "-q")
    assert out.exit_code == 0, out.output
    assert "float reference: the student's trained weights with its quantizers off: the run has no float student" \
        in out.stdout
    bad = run("explain", tmp_path / "run", "--student", SPEC, "--rank", "worst")
    assert bad.exit_code == 2 and "--rank" in bad.output and "Traceback" not in bad.output


def test_a_collapsed_probe_gets_a_caveat_line():
    from edgekd.cli.explain import render
    from edgekd.pipeline.explain import _caveat

    assert _caveat({"probe_agreement": 0.5}) is None
    text = _caveat({"probe_agreement": 0.134})
    assert text.startswith("quantized at these bits without training, the float student agrees with float on 13.4%")
    result = {"layers": [], "bundle_dir": None, "runtime_note": None, "source": "b", "weight_bits": 2, "act_bits": 2,
              "layer_bits": [], "samples": 10, "rank": "gain", "groups": [], "reference": "r", "caveat": text,
              "logits": {"sqnr_db": 1.0, "top1_agreement": 0.5, "probe_sqnr_db": 0.4, "probe_agreement": 0.134}}
    assert render(result)[-1] == f"caveat: {text}"


def test_raise_width_comes_from_catalog_target_names_only(tmp_path):
    from edgekd.pipeline.explain import _raise_bits

    fifo = tmp_path / "target.toml"
    os.mkfifo(fifo)  # a recorded "target" that is a path is never opened (a FIFO would block the read)
    assert _raise_bits("onnxruntime-cpu") == 7  # reduce_range: 8-bit rules train at 7
    assert _raise_bits("onnxruntime-arm") == 8
    assert [_raise_bits(v) for v in (str(fifo), None, 3, "no-such-target")] == [8, 8, 8, 8]
