"""Safety round 2 (issue #21): options, recipes, KD methods, model loading and sweep lists.

Every bad value is one ``error:`` line, exit 2, no traceback, and nothing written:
- every number hyper-parameter of every method has bounds (temperatures > 0 and at most
  MAX_TEMPERATURE, weights >= 0, probabilities and fractions in their range), checked as the term is
  built, worded ``method 'dkd': parameter 'beta' must be >= 0, got -1``;
- sweep lists (bits, methods, seeds): each value within the bounds of its single option, none listed
  twice, none empty;
- TOML past tomllib's limits (nesting 10,000 deep, integers of 5000 digits) in a recipe, target,
  profile or ``--param``; inf / nan and integers too long for a float wherever a number is read;
- seeds above MAX_SEED (2**32 - 1);
- damaged weights files: ``.safetensors`` headers (truncated, a header length past the file, not
  JSON, an unknown dtype, offsets out of range, a shape its bytes do not hold) and ``.pt`` files whose
  state_dict has integer keys, non-tensor values, sparse tensors, or whose metadata declares a huge
  input shape or class count;
- ``--qat-temperature`` and ``--qat-lr`` are distill options, recorded in recipe.json, and ``kd`` (the
  CE + KD form of hinton) follows the QAT-phase temperature as hinton does.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
import torch.nn.functional as F

from edgekd.config import options as op
from edgekd.core.errors import ConfigError
from edgekd.kd import LOSSES, Objective, make_loss
from tests.test_bad_input import assert_user_error, run
from tests.test_safety_paths import forbid_training, snapshot

BIG = "9" * 5000  # past Python's int-str limit (4300 digits)
DEEP = "[" * 10000 + "]" * 10000  # past tomllib's recursion
QUICK = ["--epochs", "1", "--float-epochs", "0", "--teacher-epochs", "1", "-q"]


def refused(tmp_path, monkeypatch, argv, *fragments, setup=None):
    """Run ``argv`` in tmp_path (after ``setup(tmp_path)``): one error line with every fragment, exit 2,
    no training, and the folder exactly as it was."""
    monkeypatch.chdir(tmp_path)
    forbid_training(monkeypatch)
    if setup:
        setup(tmp_path)
    before = snapshot(tmp_path)
    result = run(*argv)
    assert_user_error(result, *fragments)
    assert snapshot(tmp_path) == before
    return result


def write(name: str, text: str):
    return lambda tmp: (tmp / name).write_text(text)


# --- 1. every method's hyper-parameters have bounds -----------------------------------------------------

def _number_params():
    from dataclasses import fields

    for name in LOSSES:
        for f in fields(LOSSES.get(name)):
            if f.init and isinstance(f.default, float):
                yield name, f


def test_every_number_parameter_of_every_method_declares_bounds():
    found = list(_number_params())
    assert len(found) >= 14  # hinton 2, ce 1, kd 1, dkd 4, tfkd 3, at 1, rkd 2, fsp 1
    for name, f in found:
        bounds = f.metadata.get("bounds", {})
        assert bounds.get("lo") is not None, f"{name}.{f.name} has no lower bound"


@pytest.mark.parametrize("method, f", list(_number_params()), ids=lambda v: getattr(v, "name", v))
def test_every_number_parameter_refuses_below_its_bound_nan_inf_and_huge_integers(method, f):
    low = f.metadata["bounds"]["lo"]
    for bad in (low - 1, float("nan"), float("inf"), 10**400, "8", True):
        with pytest.raises(ConfigError, match=rf"method '{method}': parameter '{f.name}' must be"):
            make_loss(method, **{f.name: bad})
    make_loss(method, **{f.name: f.default})  # the paper default is inside its bounds


@pytest.mark.parametrize("method, key, value, fragment", [
    ("dkd", "beta", -1, "must be >= 0, got -1"), ("dkd", "alpha", -0.5, "must be >= 0"),
    ("dkd", "warmup", 2, "must be between 0 and 1"), ("hinton", "temperature", 1e200, "must be > 0 and <= 1000"),
    ("hinton", "alpha", 1.5, "must be between 0 and 1"), ("kd", "temperature", 0, "must be > 0"),
    ("tfkd", "correct_prob", 1, "must be > 0 and < 1"), ("tfkd", "multiplier", -1, "must be >= 0"),
    ("rkd", "angle_weight", -1, "must be >= 0"), ("at", "p", 0, "must be > 0"), ("fsp", "stage", 100, "must be > 0 and <= 10"),
    ("ce", "label_smoothing", 2, "must be between 0 and 1")])
def test_a_bad_method_parameter_is_one_line_before_training(method, key, value, fragment, tmp_path, monkeypatch):
    refused(tmp_path, monkeypatch, ["distill", "--method", method, "--param", f"{key}={value}", "--out", "run", *QUICK],
            f"method '{method}': parameter '{key}' {fragment}")


def test_a_bad_parameter_in_a_recipe_term_is_one_line(tmp_path, monkeypatch):
    refused(tmp_path, monkeypatch, ["distill", "--config", "r.toml", "--out", "run", *QUICK],
            "r.toml", "method 'dkd': parameter 'beta' must be >= 0, got -1",
            setup=write("r.toml", '[[loss]]\nname = "dkd"\nbeta = -1\n'))


def test_feature_layers_must_be_names(tmp_path, monkeypatch):
    refused(tmp_path, monkeypatch, ["distill", "--method", "fitnet", "--param", "student=[[1]]", "--out", "run",
                                    *QUICK], "method 'fitnet': parameter 'student' must name layers")
    assert make_loss("fitnet", student=5, teacher=["3.relu"]).student == ["5"]  # an index of a Sequential: kept


# --- 2. sweep lists --------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["--bits", "8,99"], "every bit width of --bits must be between 2 and 8, got 99"),
    (["--bits", "1"], "every bit width of --bits must be between 2 and 8, got 1"),
    (["--bits", "32"], "every bit width of --bits must be between 2 and 8, got 32"),
    (["--bits", "8,8"], "--bits lists 8 twice"),
    (["--methods", ","], "--methods lists no value"),
    (["--methods", "none,none"], "--methods lists 'none' twice"),
    (["--methods", "hinton,dkdd"], "unknown distillation method 'dkdd'"),
    (["--seeds", "0,18446744073709551616"], "every seed of --seeds must be between 0 and 4294967295"),
    (["--seeds", "1,1"], "--seeds lists 1 twice"),
    (["--seed", "-1"], "--seed must be between 0 and 4294967295, got -1")])
def test_sweep_refuses_a_bad_list_before_any_work(args, fragment, tmp_path, monkeypatch):
    refused(tmp_path, monkeypatch, ["sweep", "--methods", "none", "--bits", "8", *args, "--out", "sw",
                                    "--epochs", "1", "--float-epochs", "0"], fragment)


# --- 3. TOML limits, non-finite numbers --------------------------------------------------------------------

@pytest.mark.parametrize("text, fragment", [
    (f"a = {DEEP}\n", "nested too deeply"), (f"epochs = {BIG}\n", "more than 4300 digits"),
    ("params = {beta = " + "{b = " * 3000 + "1" + "}" * 3000 + "}\n", "nested too deeply"),
    (f"epochs = {'9' * 4000}\n", "epochs must be at most 2147483647, got an integer of 4000 digits"),
    (f"lr = {'9' * 400}\n", "lr must be a finite number"), ("lr = 1e999\n", "lr must be a finite number, got inf"),
    ("temperature = nan\n", "temperature must be a finite number, got nan"),
    ("seed = 18446744073709551616\n", "seed must be between 0 and 4294967295"),
    ('[[loss]]\nname = "dkd"\nbeta = inf\n', "parameter 'beta' must be a finite number, got inf"),
    ('[[loss]]\nname = "kd"\nweight = 1' + "0" * 400 + "\n", "weight must be a finite number >= 0")])
def test_a_recipe_past_the_limits_is_one_line(text, fragment, tmp_path, monkeypatch):
    refused(tmp_path, monkeypatch, ["distill", "--config", "r.toml", "--out", "run", *QUICK], "r.toml", fragment,
            setup=write("r.toml", text))


@pytest.mark.parametrize("value, fragment", [
    (BIG, "--param 'beta': an integer has more than 4300 digits"), (DEEP, "--param 'beta': arrays or tables"),
    ("1e999", "parameter 'beta' must be a finite number, got inf"), ("inf", "must be a finite number, got inf"),
    ("nan", "must be a finite number, got nan"), ("-inf", "must be a finite number, got -inf"),
    ("9" * 400, "must be a finite number, got an integer of 400 digits")])
def test_a_param_past_the_limits_is_one_line(value, fragment, tmp_path, monkeypatch):
    refused(tmp_path, monkeypatch, ["distill", "--method", "dkd", "--param", f"beta={value}", "--out", "run", *QUICK],
            fragment)


@pytest.mark.parametrize("command", [["targets", "show"], ["profiles", "show"], ["check", "--target"]])
@pytest.mark.parametrize("text, fragment", [(f"a = {DEEP}\n", "nested too deeply"),
                                            (f"a = {BIG}\n", "more than 4300 digits")])
def test_a_catalog_file_past_the_limits_is_one_line(command, text, fragment, tmp_path, monkeypatch):
    refused(tmp_path, monkeypatch, [*command, "x.toml"], "x.toml", fragment, setup=write("x.toml", text))


@pytest.mark.parametrize("flag, value, fragment", [
    ("--epochs", "9" * 30, "--epochs must be at most 2147483647"), ("--batch-size", "9" * 20, "at most 2147483647"),
    ("-T", "1e300", "--temperature must be > 0 and <= 1000"), ("--lr", "inf", "--lr must be a finite number"),
    ("--alpha", "nan", "--alpha must be a finite number")])
def test_cli_numbers_past_their_limits(flag, value, fragment, tmp_path, monkeypatch):
    refused(tmp_path, monkeypatch, ["distill", flag, value, "--out", "run"], fragment)


def test_an_error_never_prints_a_number_too_long_to_convert():
    with pytest.raises(ConfigError, match="got an integer of 5001 digits"):
        op.check("epochs", 10**5000)
    with pytest.raises(ConfigError, match=r"got 'xxx+\.\.\.$") as e:
        op.check("teacher_mix", "x" * 10**6)
    assert len(e.value.message) < 200


# --- 4. seeds ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["distill", "--out", "run"], ["train", "--out", "t"], ["sweep", "--out", "sw"]])
def test_a_seed_past_32_bits_is_one_line(argv, tmp_path, monkeypatch):
    refused(tmp_path, monkeypatch, [*argv, "--seed", str(2**64)],
            "--seed must be between 0 and 4294967295, got 18446744073709551616")


def test_the_largest_seed_trains(tmp_path, monkeypatch):
    """MAX_SEED plus every offset the schemes add (QAT +1, peers +100, assistants +1000) is a valid
    torch and numpy seed: a real run with it ends normally."""
    monkeypatch.chdir(tmp_path)
    result = run("distill", "--method", "none", "--bits", "8", "--seed", op.MAX_SEED, "--out", "run", *QUICK)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["seed"] == op.MAX_SEED


# --- 5. damaged weights files -------------------------------------------------------------------------------

GOOD = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}


def safetensors(header=None, body: bytes = b"\0" * 24, raw: bytes | None = None) -> bytes:
    if raw is not None:
        return raw
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def _complete() -> bytes:
    return safetensors(GOOD)


@pytest.mark.parametrize("data, fragment", [
    (b"", "truncated (0 bytes"), (_complete()[:5], "truncated (5 bytes"),
    (struct.pack("<Q", 10**12) + _complete()[8:], "header length says 1000000000000 bytes"),
    (struct.pack("<Q", 2**64 - 1) + _complete()[8:], "header length says"),
    (safetensors(b"not json"), "header is not JSON"), (safetensors(b"\xff\xfe"), "header is not JSON"),
    (safetensors(DEEP.encode()), "header is not JSON"),
    (safetensors(b'{"w": {"dtype": "F32", "shape": [' + BIG.encode() + b'], "data_offsets": [0, 24]}}'),
     "header is not JSON"),
    (safetensors([1, 2]), "not a JSON object"),
    (_complete()[:-4], "data_offsets [0, 24], outside the 20 bytes of data"),
    (safetensors({"w": {**GOOD["w"], "dtype": "F99"}}), "dtype 'F99'"),
    (safetensors({"w": {**GOOD["w"], "dtype": 7}}), "dtype 7"),
    (safetensors({"w": {**GOOD["w"], "data_offsets": [0, 2400]}}), "outside the 24 bytes"),
    (safetensors({"w": {**GOOD["w"], "data_offsets": [-1, 24]}}), "data_offsets [-1, 24]"),
    (safetensors({"w": {**GOOD["w"], "data_offsets": [0]}}), "data_offsets [0]"),
    (safetensors({"w": {**GOOD["w"], "shape": [2**40, 2**40]}}), "more than 10^18 bytes"),
    (safetensors({"w": {**GOOD["w"], "shape": [-2, -3]}}), "not a list of integers >= 0"),
    (safetensors({"w": {**GOOD["w"], "shape": "2x3"}}), "not a list of integers >= 0"),
    (safetensors({"w": {"dtype": "F32"}}), "lacks dtype, shape or data_offsets"),
    (safetensors({**GOOD, "v": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}), "overlapping or gapped"),
    (safetensors(GOOD, body=b"\0" * 28), "its tensors span 24 bytes, the file holds 28"),
    (safetensors({"__metadata__": {"a": 1}, **GOOD}), "__metadata__ is not a table of strings")])
@pytest.mark.parametrize("role", ["teacher", "student"])
def test_a_damaged_safetensors_file_is_one_line_naming_it(data, fragment, role, tmp_path, monkeypatch):
    refused(tmp_path, monkeypatch, ["distill", f"--{role}", "cnnfc-teacher=w.safetensors", "--out", "run"],
            "w.safetensors", fragment, setup=lambda tmp: (tmp / "w.safetensors").write_bytes(data))


def _edgekd_checkpoint(meta=None, state=None):
    meta = {"arch": "cnnfc-teacher", "num_classes": 10, "input_shape": [1, 8, 8]} if meta is None else meta
    return {"format": "edgekd-checkpoint-1", "meta": meta, "state_dict": {"w": torch.zeros(1)} if state is None
            else state}


@pytest.mark.parametrize("spec, obj, fragment", [
    ("cnnfc-teacher=w.pt", {0: torch.zeros(2)}, "its key 0 is not a string"),
    ("cnnfc-teacher=w.pt", {"state_dict": {("a", 1): torch.zeros(2)}}, "its key ('a', 1) is not a string"),
    ("cnnfc-teacher=w.pt", {"w": torch.zeros(2), "step": 3}, "is not a state_dict or an edgekd checkpoint"),
    ("cnnfc-teacher=w.pt", {"w": torch.zeros(3).to_sparse()}, "'w' is a torch.sparse_coo tensor"),
    ("w.pt", _edgekd_checkpoint(state={0: torch.zeros(2)}), "its key 0 is not a string"),
    ("w.pt", _edgekd_checkpoint(state={"w": [1, 2]}), "'w' holds a list"),
    ("w.pt", _edgekd_checkpoint(state=[torch.zeros(1)]), "its state_dict is a list"),
    ("w.pt", _edgekd_checkpoint(meta=["arch"]), "its metadata is not a table"),
    ("w.pt", _edgekd_checkpoint(meta={"arch": "cnnfc-teacher", "num_classes": 10, "input_shape": [1, 10**5, 10**5]}),
     "metadata 'input_shape' must be three positive integers [C, H, W] with C*H*W at most 67108864"),
    ("w.pt", _edgekd_checkpoint(meta={"arch": "cnnfc-teacher", "num_classes": 10**12, "input_shape": [1, 8, 8]}),
     "metadata 'num_classes' must be an integer between 2 and 1048576")])
def test_a_damaged_pt_file_is_one_line_naming_it(spec, obj, fragment, tmp_path, monkeypatch):
    refused(tmp_path, monkeypatch, ["distill", "--teacher", spec, "--out", "run"], "w.pt", fragment,
            setup=lambda tmp: torch.save(obj, tmp / "w.pt"))


def test_a_checkpoint_seed_past_32_bits_is_damaged(tmp_path):
    from edgekd.models.checkpoints import check_meta
    from edgekd.core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="metadata 'seed' must be an integer between 0 and 4294967295"):
        check_meta({"seed": 2**64}, "m.pt", ("seed",))


def test_a_valid_safetensors_header_passes_the_check(tmp_path):
    from edgekd.models.safefile import check_safetensors

    header = {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]},
              "c": {"dtype": "BF16", "shape": [0], "data_offsets": [40, 40]}}
    (tmp_path / "w.safetensors").write_bytes(safetensors(header, body=b"\0" * 40))
    check_safetensors(tmp_path / "w.safetensors")
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    from edgekd.models.checkpoints import load_checkpoint

    save_file({"a": torch.ones(2, 3), "b": torch.arange(4)}, str(tmp_path / "s.safetensors"), metadata={"k": "v"})
    check_safetensors(tmp_path / "s.safetensors")
    assert torch.equal(load_checkpoint(tmp_path / "s.safetensors")["state_dict"]["b"], torch.arange(4))


# --- 6. --qat-temperature and --qat-lr on the command line; 7. kd follows the QAT temperature ----------------

@pytest.mark.parametrize("argv, fragment", [
    (["--qat-temperature", "0"], "--qat-temperature must be > 0 and <= 1000, got 0"),
    (["--qat-temperature", "-1"], "--qat-temperature must be > 0"),
    (["--qat-temperature", "nan"], "--qat-temperature must be a finite number"),
    (["--qat-temperature", "5000"], "--qat-temperature must be > 0 and <= 1000"),
    (["--qat-lr", "0"], "--qat-lr must be > 0, got 0"), (["--qat-lr", "-1e-3"], "--qat-lr must be > 0"),
    (["--qat-lr", "inf"], "--qat-lr must be a finite number"),
    (["--qat-temperature", "2", "--method", "dkd"], "sets the QAT-phase temperature of --method hinton or kd, "
                                                     "not of 'dkd'")])
def test_qat_options_are_bounded(argv, fragment, tmp_path, monkeypatch):
    refused(tmp_path, monkeypatch, ["distill", *argv, "--out", "run", *QUICK], fragment)


def test_qat_options_are_in_the_help():
    out = run("distill", "--help").output
    assert "--qat-temperature" in out and "--qat-lr" in out


def test_kd_run_takes_the_qat_temperature_and_lr_and_records_them(tmp_path, monkeypatch):
    """A real kd run: its float phase trains at T=4, its QAT phase at --qat-temperature 2.5 with
    --qat-lr; recipe.json records both."""
    from edgekd.kd.response import SoftTargets
    from edgekd.training import loop

    seen, fit = [], loop.fit

    def recording_fit(model, data, cfg, loss_fn, *a, **k):
        terms = [t for _, _, t in getattr(loss_fn, "terms", []) if isinstance(t, SoftTargets)]
        if terms:
            seen.append((cfg.desc.split()[0], cfg.lr, [t.temperature for t in terms]))
        return fit(model, data, cfg, loss_fn, *a, **k)

    monkeypatch.setattr(loop, "fit", recording_fit)
    monkeypatch.chdir(tmp_path)
    result = run("distill", "--method", "kd", "--bits", "4", "--qat-temperature", 2.5, "--qat-lr", 0.0007,
                 "--epochs", 1, "--float-epochs", 1, "--teacher-epochs", 1, "--out", "run")
    assert result.exit_code == 0, result.output
    assert seen == [("float", op.default("lr"), [4.0]), ("QAT", 0.0007, [2.5])]
    assert "QAT: KD temperature 2.5 (float phase 4" in result.stderr
    recipe = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert (recipe["method"], recipe["qat_temperature"], recipe["qat_lr"]) == ("kd", 2.5, 0.0007)


@pytest.mark.parametrize("method, given, params, bits, expected", [
    ("kd", None, {}, 2, 1.0), ("kd", None, {}, 4, 4.0), ("kd", 2.5, {}, 2, 2.5), ("kd", None, {"temperature": 3}, 8, 3),
    ("hinton", None, {"temperature": 3}, 8, 3), ("hinton", None, {}, 3, 1.0), ("mse", None, {}, 2, None)])
def test_kd_gets_the_qat_temperature_hinton_gets(method, given, params, bits, expected):
    opts = op.DistillOptions(method=method, qat_temperature=given, params=params)
    assert op.qat_temperature(opts, bits, bits) == expected


def test_the_qat_phase_kd_objective_computes_the_reference_loss_at_the_qat_temperature():
    from edgekd.training.schemes import _qat_temperature

    objective, lines = Objective.single("kd"), []
    _qat_temperature(objective, 1.0, lines.append)
    assert lines == ["QAT: KD temperature 1 (float phase 4; --qat-temperature sets it)"]
    gen = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen), torch.randint(0, 5, (8,), generator=gen)
    total, _ = objective(s, t, y)
    p_t = F.softmax(t, dim=1)  # Hinton et al. 2015 at T = 1, as --method kd weighs it: 0.1 CE + 0.9 KD
    kl = (p_t * (p_t.log() - F.log_softmax(s, dim=1))).sum(1).mean()
    assert torch.allclose(total, 0.1 * F.cross_entropy(s, y) + 0.9 * kl, atol=1e-6)


def test_a_qat_temperature_for_a_recipe_without_a_kd_term_is_a_warning():
    from edgekd.training.schemes import _qat_temperature

    lines = []
    _qat_temperature(Objective.from_specs([{"name": "ce"}, {"name": "dkd"}]), 2.0, lines.append)
    assert lines == ["warning: --qat-temperature 2 is ignored: the objective has no hinton or kd term"]


def test_the_sweep_records_the_qat_temperature_of_kd_cells():
    from edgekd.pipeline.sweep import SweepOptions

    assert SweepOptions(bits=(8, 2), methods=("kd",)).qat_temperature() == {"8": 4.0, "2": 1.0}
    assert SweepOptions(bits=(8, 2), methods=("dkd",)).qat_temperature() is None
