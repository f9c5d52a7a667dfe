"""Safety round 2c: a second hostile pass after #21 and #22 (per-layer bits, explain).

Every case is one ``error:`` line, exit 2, no traceback, nothing written, and no training started:
- weights files: a pickle payload calling os.system is named as one (and never runs), a FIFO, a device,
  a symbolic-link loop is named as such (not "not found"); NaN / inf values, integer, boolean or complex
  tensors and a negative BatchNorm variance are refused when loaded (teacher, student, train --arch);
- recipes and --param: a [[loss]] name that is not a string, every weight 0, weights past 1e6; a UTF-8
  byte-order mark; a --param value of two lines, a --param given twice; digits of other scripts and
  underscores in numbers; teacher entries that are not model specs, empty model specs; 100 kB names;
- explain: a damaged model.onnx, --run naming another run or no run, a manifest.json that is a FIFO,
  an empty path;
- sweep: a recipe that sets what the sweep decides (bits, method, seed, [[loss]], [[bits]], ...), a
  bad or code-naming recipe and checkpoints before any cell, fp32 in --methods, ptq with no trained
  method, a resume after the recipe changed, '8,,4' and non-ASCII digits in lists; huge ensemble weights.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from edgekd import models
from tests.test_bad_input import assert_user_error, run
from tests.test_safety_config import QUICK, refused, write
from tests.test_safety_paths import forbid_training, snapshot

MARKER = "PWNED"
META = {"arch": "cnnfc-teacher", "num_classes": 10, "input_shape": [1, 8, 8], "dataset": "digits", "seed": 0,
        "classes": [str(i) for i in range(10)], "normalization": {"mean": [0.3], "std": [0.4]}}


def _state():
    torch.manual_seed(0)
    return models.build_model("cnnfc-teacher", 10, (1, 8, 8)).state_dict()


def _weights(name: str, change=None):
    """A setup writing cnnfc-teacher weights (a plain state_dict) to ``name``, changed by ``change``."""
    def setup(tmp):
        state = _state()
        if change:
            change(state)
        torch.save(state, tmp / name)
    return setup


def _first_float(state, fn):
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = fn(state[key])


class _System:
    """A pickle payload that runs a shell command when unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


# --- 1. weights files ---------------------------------------------------------------------------------

def test_a_pickle_payload_calling_os_system_is_named_and_never_runs(tmp_path, monkeypatch):
    def setup(tmp):
        torch.save({"state_dict": _System(tmp / MARKER)}, tmp / "evil.pt")
    for spec in ("evil.pt", "cnnfc-teacher=evil.pt"):
        refused(tmp_path, monkeypatch, ["distill", "--teacher", spec, "--out", "run", *QUICK],
                "refusing to load evil.pt", "a pickled object (posix.system)", setup=setup)
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("kind, fragment", [("fifo", "is a FIFO (named pipe), not a regular file"),
                                            ("loop", "is a symbolic link that loops"),
                                            ("dangling", "is a symbolic link to a missing path"),
                                            ("device", "is a device, not a regular file")])
def test_special_files_given_as_inputs_are_named_not_opened(kind, fragment, tmp_path, monkeypatch):
    def setup(tmp):
        if kind == "fifo":
            os.mkfifo(tmp / "x.pt")
        elif kind == "loop":
            os.symlink("y.pt", tmp / "x.pt")
            os.symlink("x.pt", tmp / "y.pt")
        elif kind == "dangling":
            os.symlink(tmp / "nowhere" / "x.pt", tmp / "x.pt")
        else:
            os.symlink("/dev/zero", tmp / "x.pt")
    refused(tmp_path, monkeypatch, ["distill", "--teacher", "x.pt", "--out", "run", *QUICK],
            "teacher checkpoint x.pt", fragment, setup=setup)
    refused(tmp_path, monkeypatch, ["distill", "--teacher", "cnnfc-teacher=x.pt", "--out", "run", *QUICK],
            "teacher checkpoint x.pt", fragment)
    refused(tmp_path, monkeypatch, ["distill", "--student", "cnnfc-student=x.pt", "--out", "run", *QUICK],
            "weights file x.pt", fragment)
    refused(tmp_path, monkeypatch, ["distill", "--config", "x.pt", "--out", "run", *QUICK], "recipe x.pt", fragment)


NAN = (lambda s: _first_float(s, lambda t: torch.full_like(t, float("nan"))), "holds NaN or infinite values")
INF = (lambda s: _first_float(s, lambda t: t.clone().index_fill_(0, torch.tensor([0]), float("inf"))),
       "holds NaN or infinite values")
INT = (lambda s: _first_float(s, lambda t: t.to(torch.int32)), "is int32, the model's is float32")
BOOL = (lambda s: _first_float(s, lambda t: t.bool()), "is bool, the model's is float32")
COMPLEX = (lambda s: _first_float(s, lambda t: t.to(torch.complex64)), "is complex64, the model's is float32")
NEG_VAR = (lambda s: s.__setitem__("1.running_var", -torch.ones_like(s["1.running_var"])),
           "(a BatchNorm variance) holds negative values")


@pytest.mark.parametrize("change, fragment", [NAN, INF, INT, BOOL, COMPLEX, NEG_VAR],
                         ids=["nan", "inf", "int", "bool", "complex", "negative-variance"])
def test_weights_that_load_but_break_the_model_are_refused(change, fragment, tmp_path, monkeypatch):
    setup = _weights("w.pt", change)
    refused(tmp_path, monkeypatch, ["distill", "--teacher", "cnnfc-teacher=w.pt", "--out", "run", *QUICK],
            "w.pt: tensor", fragment, setup=setup)  # was: a teacher "near chance", or training
    refused(tmp_path, monkeypatch, ["distill", "--student", "cnnfc-teacher=w.pt", "--teacher", "cnnfc-teacher=w.pt",
                                    "--out", "run", *QUICK], "w.pt: tensor", fragment)


def test_an_edgekd_checkpoint_with_nan_weights_is_refused(tmp_path, monkeypatch):
    def setup(tmp):
        state = _state()
        NAN[0](state)
        models.save_checkpoint(tmp / "t.pt", state, META)
    refused(tmp_path, monkeypatch, ["distill", "--teacher", "t.pt", "--out", "run", *QUICK],
            "checkpoint t.pt: tensor", "holds NaN or infinite values", setup=setup)
    refused(tmp_path, monkeypatch, ["train", "--arch", "cnnfc-teacher=t.pt", "--epochs", "1", "--out", "t2", "-q"],
            "holds NaN or infinite values")


def test_half_precision_weights_still_load():
    model = models.build_model("cnnfc-teacher", 10, (1, 8, 8))
    models.apply_weights(model, {k: v.half() if v.is_floating_point() else v for k, v in _state().items()}, "w.pt")


# --- 2. recipes and --param ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["5", '["ce"]', "{a = 1}"])
def test_a_loss_name_that_is_not_a_string_is_one_line(name, tmp_path, monkeypatch):
    refused(tmp_path, monkeypatch, ["distill", "--config", "r.toml", "--out", "run", *QUICK],
            "r.toml: [[loss]] #1: name must be a method name (a string)", setup=write("r.toml", f"[[loss]]\nname = {name}\n"))


@pytest.mark.parametrize("text, fragment", [
    ('[[loss]]\nname = "ce"\nweight = 0\n[[loss]]\nname = "kd"\nweight = 0.0\n', "every [[loss]] term has weight 0"),
    ('[[loss]]\nname = "ce"\nweight = -0.0\n', "the only [[loss]] term has weight 0"),
    ('[[loss]]\nname = "fsp"\nweight = 0\n[[loss]]\nname = "ce"\n', "every [[loss]] term of the first stage (fsp)"),
    ('[[loss]]\nname = "ce"\nweight = 1e308\n[[loss]]\nname = "kd"\nweight = 1e308\n',
     "'ce': weight must be at most 1000000, got 1e+308"),
    ('[[loss]]\nname = "dkd"\nbeta = 1e308\n', "parameter 'beta' must be at most 1000000")])
def test_loss_weights_that_learn_nothing_or_overflow_are_refused(text, fragment, tmp_path, monkeypatch):
    refused(tmp_path, monkeypatch, ["distill", "--config", "r.toml", "--out", "run", *QUICK], "r.toml", fragment,
            setup=write("r.toml", text))


def test_a_recipe_with_a_byte_order_mark_is_read(tmp_path, monkeypatch):
    refused(tmp_path, monkeypatch, ["distill", "--config", "r.toml", "--out", "run", *QUICK],
            "r.toml: epochs must be an integer >= 1, got 'x'",  # was: not valid TOML at line 1
            setup=lambda tmp: (tmp / "r.toml").write_text('\ufeffepochs = "x"\n', encoding="utf-8"))


@pytest.mark.parametrize("params, fragment", [
    (["temperature=4\nalpha=0.5"], "parameter 'temperature' must be a number, got '4\\nalpha=0.5'"),
    (["beta=1", "beta=2"], "--param 'beta' is given twice"),
    (["k" * 100_000 + "=1"], "has no parameter 'kkkkk")])
def test_param_values_are_one_value_each(params, fragment, tmp_path, monkeypatch):
    argv = ["distill", "--method", "dkd" if "beta" in params[0] else "hinton"]
    for p in params:
        argv += ["--param", p]
    result = refused(tmp_path, monkeypatch, [*argv, "--out", "run", *QUICK], fragment)
    assert max(len(line) for line in result.output.splitlines()) < 1000


@pytest.mark.parametrize("argv, fragment", [
    (["distill", "--epochs", "\u0661"], "'١' is not a valid integer (ASCII digits only)"),
    (["distill", "-T", "\uff14"], "'４' is not a valid float (ASCII digits only)"),
    (["distill", "--lr", "1_0"], "'1_0' is not a valid float"),
    (["distill", "--seed", "\u0661"], "is not a valid integer"),
    (["distill", "--scheme", "progressive", "--bit-schedule", "\u0668,4"], "--bit-schedule takes comma-separated"),
    (["explain", "--samples", "\uff15"], "'５' is not a valid integer"),
    (["sweep", "--bits", "\uff18"], "expected comma-separated integers, got '８'"),
    (["sweep", "--bits", "8,,4"], "got '8,,4' (an empty item)"),
    (["sweep", "--bits", "8", "--seeds", "0,"], "got '0,' (an empty item)")])
def test_numbers_on_the_command_line_are_ascii(argv, fragment, tmp_path, monkeypatch):
    out = ["--json"] if argv[0] == "explain" else ["--out", "run"]
    refused(tmp_path, monkeypatch, [*argv, *out], fragment)


@pytest.mark.parametrize("argv, setup, fragment", [
    (["--config", "r.toml"], write("r.toml", "teacher = [1, 2]\n"), "teacher must be a model spec"),
    (["--config", "r.toml"], write("r.toml", "teacher = [{a = 1}]\n"), "teacher must be a model spec"),
    (["--teacher", ""], None, "teacher must be a model spec"),
    (["--student", ""], None, "model spec '' is empty"),
    (["--student", " "], None, "model spec ' ' is empty"),
    (["--method", "h" * 100_000], None, "unknown distillation method 'hhhh")])
def test_model_specs_and_names(argv, setup, fragment, tmp_path, monkeypatch):
    result = refused(tmp_path, monkeypatch, ["distill", *argv, "--out", "run", *QUICK], fragment, setup=setup)
    assert max(len(line) for line in result.output.splitlines()) < 1000


def test_ensemble_weights_whose_sum_overflows_are_refused(tmp_path, monkeypatch):
    def setup(tmp):
        torch.manual_seed(0)
        models.save_checkpoint(tmp / "t.pt", _state(), META)
    refused(tmp_path, monkeypatch, ["distill", "--teacher", "t.pt", "--teacher", "t.pt", "--teacher-weight", "1e308",
                                    "--teacher-weight", "1e308", "--force", "--out", "run", *QUICK],
            "the teacher weights [1e+308, 1e+308] sum past what a float holds", setup=setup)


# --- 3. explain ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A W8A8 run exported for onnxruntime-cpu, and a W4A4 run (QAT alone, 1 epoch on 64 digits)."""
    root = tmp_path_factory.mktemp("explain2c")
    (root / "r.toml").write_text("train_limit = 64\n")
    for bits, name in ((8, "run8"), (4, "run4")):
        result = run("distill", "--method", "none", "--bits", bits, "--epochs", 1, "--float-epochs", 0,
                     "--config", root / "r.toml", "--out", root / name, "-q")
        assert result.exit_code == 0, result.output
    result = run("export", root / "run8", "--out", root / "b8", "-q")
    assert result.exit_code == 0, result.output
    return root


def _explain_refused(tmp_path, argv, *fragments):
    before = snapshot(tmp_path)
    assert_user_error(run("explain", *argv), *fragments)
    assert snapshot(tmp_path) == before


def test_explain_refuses_a_run_that_is_not_the_bundles(runs, tmp_path):
    shutil.copytree(runs / "b8", tmp_path / "b8")
    _explain_refused(tmp_path, [tmp_path / "b8", "--run", runs / "run4"],
                     "was not exported from the student in", "weight_bits 7 in the bundle, 4 in the run",
                     "pass the run it was exported from with --run")
    _explain_refused(tmp_path, [tmp_path / "b8", "--run", tmp_path / "nope"],
                     f"--run {tmp_path / 'nope'} is not a run directory (no student.pt in it)")
    ok = run("explain", tmp_path / "b8", "--run", runs / "run8", "--samples", 20, "-q")
    assert ok.exit_code == 0, ok.output


def test_explain_refuses_a_damaged_bundle(runs, tmp_path):
    shutil.copytree(runs / "b8", tmp_path / "b8")
    (tmp_path / "b8" / "model.onnx").write_bytes(b"not protobuf")  # was: a protobuf DecodeError traceback
    _explain_refused(tmp_path, [tmp_path / "b8", "--run", runs / "run8"], "model.onnx sha256 differs from the manifest")
    shutil.rmtree(tmp_path / "b8")
    shutil.copytree(runs / "b8", tmp_path / "b8")
    (tmp_path / "b8" / "manifest.json").unlink()
    os.mkfifo(tmp_path / "b8" / "manifest.json")
    _explain_refused(tmp_path, [tmp_path / "b8"], "manifest.json is a FIFO (named pipe), not a regular file")
    _explain_refused(tmp_path, [""], "must not be empty")


# --- 4. sweep ------------------------------------------------------------------------------------------

SWEEP = ["sweep", "--methods", "none", "--bits", "8", "--epochs", "1", "--float-epochs", "0", "--out", "sw", "-q"]


@pytest.mark.parametrize("text, fragment", [
    ("weight_bits = 4\n", "r.toml sets weight_bits, which the sweep decides"),
    ('method = "dkd"\n', "r.toml sets method"), ("seed = 3\n", "r.toml sets seed"),
    ('[[loss]]\nname = "ce"\n', "r.toml sets [[loss]]"), ('[[bits]]\ntype = "conv"\nweight = 8\n', "sets layer_bits"),
    ('teacher = "evilmod:make"\n', "r.toml sets teacher"), ('normalize = "imagenet"\n', "r.toml sets normalize"),
    ('epochs = "x"\n', "r.toml: epochs must be an integer >= 1"),
    ('scheme = "assistant"\nassistants = ["evilmod:make"]\n', "assistants names the model 'evilmod:make'"),
    ("params = {beta = 8}\n", "r.toml: params: method 'none' has no parameter 'beta'")])
def test_sweep_checks_its_recipe_before_any_cell(text, fragment, tmp_path, monkeypatch):
    refused(tmp_path, monkeypatch, [*SWEEP, "--config", "r.toml"], fragment, setup=write("r.toml", text))


@pytest.mark.parametrize("args, fragment", [
    (["--methods", "fp32"], "--methods lists fp32, which is not a method"),
    (["--methods", "ptq"], "ptq takes the float student of a trained method"),
    (["--config", "nope.toml"], "recipe not found: nope.toml"),
    (["--student", "nosuch"], "unknown model 'nosuch'"),
    (["--teacher", "nope.pt"], "teacher checkpoint not found: nope.pt")])
def test_sweep_refuses_what_every_cell_would_before_any_cell(args, fragment, tmp_path, monkeypatch):
    refused(tmp_path, monkeypatch, [*SWEEP, *args], fragment)  # was: one error row per cell, exit 1


def test_sweep_refuses_a_checkpoint_naming_code(tmp_path, monkeypatch):
    def setup(tmp):
        (tmp / "evilmod.py").write_text(f"open({str(tmp / MARKER)!r}, 'w').close()\n")
        models.save_checkpoint(tmp / "t.pt", _state(), META | {"arch": "evilmod:make"})
    monkeypatch.syspath_prepend(str(tmp_path))
    refused(tmp_path, monkeypatch, [*SWEEP, "--teacher", "t.pt"], "t.pt names the model 'evilmod:make'",
            "--teacher evilmod:make=t.pt", setup=setup)
    assert not (tmp_path / MARKER).exists()


def test_sweep_resume_refuses_an_edited_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    forbid_training(monkeypatch)  # the first sweep's cell is an error row; its sweep.json is written
    (tmp_path / "r.toml").write_text("lr = 0.001\n")
    first = run(*SWEEP, "--config", "r.toml")
    assert "error" in first.output and json.loads((tmp_path / "sw" / "sweep.json").read_text())["recipe"]["config_sha256"]
    (tmp_path / "r.toml").write_text("lr = 0.01\n")
    before = snapshot(tmp_path)
    assert_user_error(run(*SWEEP, "--config", "r.toml"), "sweep root sw was made with other options", "config_sha256")
    assert snapshot(tmp_path) == before
