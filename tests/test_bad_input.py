"""Every bad input in one table: each case prepares files in a temp dir, runs the CLI there and checks
the user-error contract - a non-zero exit, exactly one ``error:`` line naming the problem (on stderr,
last, after any labelled info:/warning: pre-flight notes), no traceback, and nothing written or
changed in the directory (so an export onto an existing bundle leaves it as it was, and a pickle
payload's marker file never appears).

Bench isolates a broken bundle as an ``error`` row rather than refusing (DESIGN: failures per row,
strictness opt-in), so its bundle cases run with ``--strict`` (exit 1) and check the row's one
``NAME: error:`` line instead.

No case may train: ``edgekd.training.loop.fit`` is replaced by a function that fails the test at once.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgekd.cli import main
from tests.test_backends import _fake_trt_bundle
from tests.test_bench import make_bundle


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *fragments, code=2, prefix="error:"):
    """One error line (starting with ``prefix``) holding every fragment; exit ``code``; no traceback."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1, result.output
    if prefix == "error:":  # a CLI-level error: stderr holds labelled notes, then the error line, last
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines and lines[-1] == errors[0], result.stderr
        assert all(line.startswith(("info:", "warning:", "error:")) for line in lines), result.stderr
    else:  # a bench row: no CLI-level error line at all
        assert not [line for line in result.output.splitlines() if line.startswith("error:")], result.output
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its content hash ('dir' for folders)."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """A bad input must fail before training: fail the test at once if one gets that far."""
    import edgekd.training.loop

    def refuse(*args, **kwargs):
        raise AssertionError("a bad input reached training")

    monkeypatch.setattr(edgekd.training.loop, "fit", refuse)


# --- files the cases prepare -------------------------------------------------------------------------

MARKER = "PWNED"


class Payload:
    """Unpickled, this creates the file ``path`` (torch.save pickles the call, not the class)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def text(name: str, content: str):
    def setup(tmp: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(textwrap.dedent(content))
    return setup


def both(*setups):
    def setup(tmp: Path) -> None:
        for s in setups:
            s(tmp)
    return setup


def _save_teacher(path: Path, arch: str, num_classes: int, built_as: str | None = None) -> None:
    from edgekd.models import build_model, save_checkpoint

    model = build_model(built_as or arch, num_classes, (1, 8, 8))
    meta = {"arch": arch, "num_classes": num_classes, "input_shape": [1, 8, 8], "dataset": "digits", "seed": 0,
            "classes": [str(i) for i in range(num_classes)], "normalization": {"mean": [0], "std": [1]}}
    save_checkpoint(path, model.state_dict(), meta)


def teacher_five_classes(tmp):
    _save_teacher(tmp / "t5.pt", "cnn-student", 5)


def teacher_wrong_arch(tmp):
    _save_teacher(tmp / "wrong.pt", "cnn-teacher", 10, built_as="cnn-student")


def evil_teacher(tmp):
    torch.save({"format": "edgekd-checkpoint-1", "meta": {}, "state_dict": {"w": Payload(tmp / MARKER)}},
               tmp / "evil.pt")


def raw_pickle_teacher(tmp):
    """The legacy (non-zip) format: a plain pickle stream."""
    with open(tmp / "old.pt", "wb") as f:
        pickle.dump({"state_dict": Payload(tmp / MARKER)}, f)


def plain_state_dict(tmp):
    torch.save({"w": torch.zeros(2)}, tmp / "weights.pt")


def truncated_teacher(tmp):
    plain_state_dict(tmp)
    (tmp / "cut.pt").write_bytes((tmp / "weights.pt").read_bytes()[:64])


def wrong_npz(tmp):
    np.savez(tmp / "data.npz", a=np.zeros((4, 8, 8)), b=np.zeros(4))


def old_bundle(tmp):
    make_bundle(tmp / "bundles", "old")


def run_dir(student: str = "truncated", metrics: bool = True):
    """A run directory whose student.pt is a pickle payload, a plain state_dict or truncated."""
    def setup(tmp: Path) -> None:
        (tmp / "run").mkdir()
        path = tmp / "run" / "student.pt"
        if student == "evil":
            torch.save({"format": "edgekd-checkpoint-1", "meta": {"quant": {}}, "state_dict": Payload(tmp / MARKER)},
                       path)
        elif student == "state_dict":
            torch.save({"w": torch.zeros(2)}, path)
        else:  # the first bytes of a real checkpoint, as after an interrupted copy
            torch.save({"w": torch.zeros(2)}, path)
            path.write_bytes(path.read_bytes()[:64])
        if metrics:
            (tmp / "run" / "metrics.json").write_text(json.dumps({"student_accuracy": 0.9}))
    return setup


def bundle(kind: str):
    def setup(tmp: Path) -> None:
        path = _fake_trt_bundle(tmp / "b") if kind.startswith("trt") else make_bundle(tmp, "b")
        if kind.endswith("tampered"):
            with open(path / "model.onnx", "ab") as f:
                f.write(b"\0")
        elif kind.endswith("garbage-manifest"):
            (path / "manifest.json").write_text('{"target": "onnxrunt')
        elif kind == "no-eval":
            (path / "eval.npz").unlink()
    return setup


PROFILE_HEAD = 'description = "mine"\ntargets = ["onnxruntime-cpu"]\n'
TARGET_HEAD = 'backend = "onnxruntime"\nflavour = "qdq"\n'

# (id, files to prepare, argv, fragments of the error line[, exit code[, prefix of the error line]])
CASES = [
    # --- distill: names -------------------------------------------------------------------------------
    ("distill-unknown-dataset", None, ["distill", "--data", "digts"],
     ["unknown dataset 'digts'", "did you mean 'digits'"]),
    ("distill-unknown-student", None, ["distill", "--student", "cnn-studnt"],
     ["unknown model 'cnn-studnt'", "did you mean 'cnn-student'"]),
    ("distill-unknown-torchvision-student", None, ["distill", "--student", "torchvision:resnet19"],
     ["unknown torchvision model 'resnet19'"]),
    ("distill-student-callable-not-importable", None, ["distill", "--student", "nosuchmod:build"],
     ["cannot load model callable 'nosuchmod:build'", "package.module:function"]),
    ("distill-unknown-target", None, ["distill", "--target", "jetsn"],
     ["unknown target 'jetsn'", "did you mean 'jetson'"]),
    ("distill-unknown-method", None, ["distill", "--method", "hintn"],
     ["unknown distillation method 'hintn'", "did you mean 'hinton'"]),
    ("distill-unknown-option", None, ["distill", "--bitz", "4"], ["No such option '--bitz'", "'--bits'"]),
    # --- distill: numbers -----------------------------------------------------------------------------
    ("distill-bits-9", None, ["distill", "--bits", "9"], ["--bits must be between 2 and 8, got 9"]),
    ("distill-bits-1", None, ["distill", "--bits", "1"], ["--bits must be between 2 and 8, got 1"]),
    ("distill-act-bits-12", None, ["distill", "--act-bits", "12"], ["--act-bits must be between 2 and 8"]),
    ("distill-first-last-bits-9", None, ["distill", "--first-last-bits", "9"],
     ["--first-last-bits must be between 2 and 8 or 'same'"]),
    ("distill-bit-schedule-not-ints", None, ["distill", "--bit-schedule", "8,x"],
     ["--bit-schedule takes comma-separated integers, got '8,x'"]),
    ("distill-negative-epochs", None, ["distill", "--epochs", "-1"],
     ['--epochs must be >= 1, got -1']),
    ("distill-zero-epochs", None, ["distill", "--epochs", "0"], ['--epochs must be >= 1']),
    ("distill-negative-float-epochs", None, ["distill", "--float-epochs", "-1"],
     ['--float-epochs must be >= 0']),
    ("distill-target-rejects-act-bits", None, ["distill", "--target", "jetson", "--act-bits", "4"],
     ["W8A4 cannot be deployed to tensorrt-int8", "does not accept 4-bit activations", "use --act-bits 8"]),
    # --- distill: --param -----------------------------------------------------------------------------
    ("param-without-equals", None, ["distill", "--param", "beta"], ["--param takes KEY=VALUE, got 'beta'"]),
    ("param-unknown", None, ["distill", "--method", "dkd", "--param", "betta=8"],
     ["method 'dkd' has no parameter 'betta'", "did you mean 'beta'"]),
    ("param-not-a-number", None, ["distill", "--method", "dkd", "--param", "beta=big"],
     ["parameter 'beta' must be a number, got 'big'"]),
    # --- distill: data --------------------------------------------------------------------------------
    ("npz-missing", None, ["distill", "--data", "npz:nothing.npz"], ["dataset file not found: nothing.npz"]),
    ("npz-wrong-keys", wrong_npz, ["distill", "--data", "npz:data.npz"],
     ["data.npz must hold arrays 'x' and 'y', found ['a', 'b']"]),
    ("dataset-dir-missing", None, ["distill", "--data", "fashion-mnist:no_such_dir"],
     ["Fashion-MNIST file", "not found in no_such_dir", "apt-get install"]),
    # --- distill: teacher checkpoints -----------------------------------------------------------------
    ("teacher-missing", None, ["distill", "--teacher", "missing/teacher.pt"],
     ["teacher checkpoint not found: missing/teacher.pt"]),
    ("teacher-pickle-payload", evil_teacher, ["distill", "--teacher", "evil.pt"],
     ["refusing to load evil.pt", "a pickled object (io.open)", "re-save it as a state_dict"]),
    ("teacher-raw-pickle-payload", raw_pickle_teacher, ["distill", "--teacher", "old.pt"],
     ["refusing to load old.pt", "a pickle payload"]),
    ("teacher-other-class-count", teacher_five_classes, ["distill", "--teacher", "t5.pt"],
     ["predicts 5 classes but the dataset has 10"]),
    ("teacher-does-not-fit", teacher_wrong_arch, ["distill", "--teacher", "wrong.pt"],
     ["checkpoint wrong.pt does not fit the architecture"]),
    ("teacher-without-architecture", plain_state_dict, ["distill", "--teacher", "weights.pt"],
     ["weights.pt has weights but no architecture", "edgekd train"]),
    ("teacher-truncated", truncated_teacher, ["distill", "--teacher", "cut.pt"],
     ["cannot read checkpoint cut.pt: truncated, corrupt or not a PyTorch file"]),
    # --- distill --config recipes ---------------------------------------------------------------------
    ("recipe-missing", None, ["distill", "--config", "nope.toml"], ["recipe not found: nope.toml"]),
    ("recipe-invalid-toml", text("r.toml", "epochs = \n"), ["distill", "--config", "r.toml"],
     ["r.toml is not valid TOML"]),
    ("recipe-unknown-key", text("r.toml", "epocs = 3\n"), ["distill", "--config", "r.toml"],
     ["r.toml: unknown key 'epocs'", "did you mean 'epochs'"]),
    ("recipe-wrong-type", text("r.toml", 'epochs = "ten"\n'), ["distill", "--config", "r.toml"],
     ["r.toml: epochs must be an integer >= 1, got 'ten'"]),
    ("recipe-bool-for-int", text("r.toml", "batch_size = true\n"), ["distill", "--config", "r.toml"],
     ["r.toml: batch_size must be an integer >= 1, got True"]),
    ("recipe-bits-out-of-range", text("r.toml", "weight_bits = 9\n"), ["distill", "--config", "r.toml"],
     ["r.toml: weight_bits must be between 2 and 8, got 9"]),
    ("recipe-negative-epochs", text("r.toml", "teacher_epochs = -3\n"), ["distill", "--config", "r.toml"],
     ["r.toml: teacher_epochs must be >= 1, got -3"]),
    ("recipe-unknown-scheme", text("r.toml", 'scheme = "bornagain"\n'), ["distill", "--config", "r.toml"],
     ["scheme must be one of offline, born-again", "did you mean 'born-again'", "did you mean 'born-again'"]),
    ("recipe-loss-not-a-list", text("r.toml", "loss = 3\n"), ["distill", "--config", "r.toml"],
     ["'loss' must be a list of tables"]),
    ("recipe-loss-without-name", text("r.toml", "[[loss]]\nweight = 1.0\n"), ["distill", "--config", "r.toml"],
     ["[[loss]] #1 has no 'name'"]),
    ("recipe-loss-unknown-method", text("r.toml", '[[loss]]\nname = "dkdd"\n'), ["distill", "--config", "r.toml"],
     ["unknown distillation method 'dkdd'", "did you mean 'dkd'"]),
    ("recipe-loss-unknown-key", text("r.toml", '[[loss]]\nname = "dkd"\nbetta = 8.0\n'),
     ["distill", "--config", "r.toml"], ["[[loss]] #1 (dkd): unknown key 'betta'", "did you mean 'beta'"]),
    ("recipe-loss-weight-not-a-number", text("r.toml", '[[loss]]\nname = "kd"\nweight = "heavy"\n'),
     ["distill", "--config", "r.toml"], ["[[loss]] #1 'kd': weight must be a finite number >= 0, got 'heavy'"]),
    ("recipe-loss-param-not-a-number", text("r.toml", '[[loss]]\nname = "dkd"\nbeta = "big"\n'),
     ["distill", "--config", "r.toml"], ["parameter 'beta' must be a number, got 'big'"]),
    # --- user target .toml files ------------------------------------------------------------------------
    ("target-file-missing", None, ["distill", "--target", "mine.toml"], ["target file not found: mine.toml"]),
    ("target-file-invalid-toml", text("mine.toml", "backend = \n"), ["targets", "show", "mine.toml"],
     ["mine.toml: invalid TOML"]),
    ("target-file-unknown-key", text("mine.toml", TARGET_HEAD + "weigth_bits = [8]\n"),
     ["distill", "--target", "mine.toml"], ["mine.toml: unknown key 'weigth_bits'", "did you mean 'weight_bits'"]),
    ("target-file-wrong-type", text("mine.toml", TARGET_HEAD + 'opset = "13"\n'), ["targets", "show", "mine.toml"],
     ["mine.toml: key 'opset' must be int, got str '13'"]),
    ("target-file-unknown-backend", text("mine.toml", 'backend = "onnxrt"\nflavour = "qdq"\n'),
     ["check", "--target", "mine.toml"], ["unknown backend 'onnxrt'", "did you mean", "'onnxruntime'"]),
    ("target-file-rejects-weight-bits", text("mine.toml", TARGET_HEAD + "weight_bits = [8]\n"),
     ["distill", "--target", "mine.toml", "--weight-bits", "3"],
     ["W3A8 cannot be deployed to mine", "does not accept 3-bit weights", "use --weight-bits 8"]),
    ("targets-show-unknown", None, ["targets", "show", "tensorrt-int9"], ["did you mean 'tensorrt-int8'"]),
    # --- profiles ---------------------------------------------------------------------------------------
    ("profiles-show-unknown", None, ["profiles", "show", "rpi6"], ["unknown profile 'rpi6'", "did you mean 'rpi5'"]),
    ("profile-file-missing", None, ["profiles", "show", "mine.toml"], ["profile file not found: mine.toml"]),
    ("profile-file-wrong-type", text("p.toml", PROFILE_HEAD + '[bench]\niterations = "many"\n'),
     ["profiles", "show", "p.toml"], ["p.toml [bench]: key 'iterations' must be int, got str 'many'"]),
    ("profile-file-unknown-key", text("p.toml", PROFILE_HEAD + "[budgets]\nlatency_msec = 3\n"),
     ["profiles", "show", "p.toml"], ["unknown key 'latency_msec'", "did you mean 'latency_ms'"]),
    ("profile-file-unknown-target", text("p.toml", 'targets = ["onnxruntime-cpux"]\n'),
     ["profiles", "show", "p.toml"], ["targets lists unknown target 'onnxruntime-cpux'", "'onnxruntime-cpu'"]),
    ("profile-file-without-targets", text("p.toml", 'description = "no targets"\n'), ["profiles", "show", "p.toml"],
     ["missing required key 'targets'"]),
    # --- bench --------------------------------------------------------------------------------------------
    ("bench-no-bundle", None, ["bench"], ["no bundle found", "edgekd export"]),
    ("bench-missing-bundle", None, ["bench", "nope"], ["no such bundle: nope"]),
    ("bench-unknown-profile", bundle("ort"), ["bench", "b", "--profile", "rpi6", "--json", "out.json"],
     ["unknown profile 'rpi6'", "did you mean"]),
    ("bench-profile-file-wrong-type", both(bundle("ort"), text("p.toml", PROFILE_HEAD + "[budgets]\nsize_mb = \"1\"\n")),
     ["bench", "b", "--profile", "p.toml"], ["key 'size_mb' must be number, got str '1'"]),
    ("bench-negative-threads", bundle("ort"), ["bench", "b", "--threads", "-1"], ['--threads must be between 0 and 1024, got -1']),
    ("bench-model-modified-after-export", bundle("ort-tampered"), ["bench", "b", "--strict"],
     ["model.onnx sha256 differs from the manifest", "re-export"], 1, "b: error:"),
    ("bench-garbage-manifest", bundle("ort-garbage-manifest"), ["bench", "b", "--strict"],
     ["b/manifest.json is not valid JSON"], 1, "b: error:"),
    ("bench-eval-npz-missing", bundle("no-eval"), ["bench", "b", "--strict"], ["eval.npz is missing"], 1, "b: error:"),
    # --- compile ------------------------------------------------------------------------------------------
    ("compile-no-bundle", None, ["compile"], ["no bundle found"]),
    ("compile-onnxruntime-bundle", bundle("ort"), ["compile", "b"], ["only TensorRT bundles are compiled"]),
    ("compile-model-modified-after-export", bundle("trt-tampered"), ["compile", "b"],
     ["model.onnx sha256 differs from the manifest"]),
    ("compile-garbage-manifest", bundle("trt-garbage-manifest"), ["compile", "b"], ["is not valid JSON"]),
    # --- check --------------------------------------------------------------------------------------------
    ("check-without-target", None, ["check"], ["Missing option '--target'"]),
    ("check-unknown-target", None, ["check", "--target", "nope"], ["unknown target 'nope'"]),
    ("check-rejected-act-bits", None, ["check", "--target", "jetson", "--act-bits", "4"],
     ["W8A4 cannot be deployed to tensorrt-int8 (1 error)"]),
    ("check-bits-9", None, ["check", "--target", "cpu", "--bits", "9"], ["W9A9 cannot be deployed", "(2 errors)"]),
    # --- export -------------------------------------------------------------------------------------------
    ("export-no-run", None, ["export"], ["no distilled run found"]),
    ("export-not-a-run-dir", None, ["export", "no_such_run"], ["no_such_run is not a run directory"]),
    ("export-target-without-value", None, ["export", "--target"], ["Option '--target' requires an argument"]),
    ("export-run-without-metrics", run_dir(metrics=False), ["export", "run"],
     ["run is not a run directory (no metrics.json)"]),
    ("export-unknown-target-onto-bundle", both(run_dir(), old_bundle),
     ["export", "run", "--target", "jetsn", "--out", "bundles/old"], ["unknown target 'jetsn'"]),
    ("export-pickle-payload-onto-bundle", both(run_dir("evil"), old_bundle),
     ["export", "run", "--out", "bundles/old"], ["refusing to load run/student.pt", "pickled object"]),
    ("export-truncated-checkpoint-onto-bundle", both(run_dir(), old_bundle), ["export", "run", "--out", "bundles/old"],
     ["cannot read checkpoint run/student.pt: truncated"]),
    ("export-state-dict-is-not-a-student", run_dir("state_dict"), ["export", "run"],
     ["run/student.pt is not a distilled student"]),
    # --- sweep --------------------------------------------------------------------------------------------
    ("sweep-bits-not-ints", None, ["sweep", "--bits", "8,x"], ["expected comma-separated integers, got '8,x'"]),
    ("sweep-unknown-method", None, ["sweep", "--methods", "hinton,hintn"],
     ["unknown distillation method 'hintn'", "did you mean 'hinton'"]),
    ("sweep-unknown-target", None, ["sweep", "--target", "nope"], ["unknown target 'nope'"]),
    ("sweep-profile-file-missing", None, ["sweep", "--profile", "mine.toml"], ["profile file not found: mine.toml"]),
]


def _param(name, setup, argv, fragments, code=2, prefix="error:"):
    return pytest.param(setup, argv, fragments, code, prefix, id=name)


@pytest.mark.parametrize("setup, argv, fragments, code, prefix", [_param(*case) for case in CASES])
def test_bad_input(setup, argv, fragments, code, prefix, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if setup:
        setup(tmp_path)
    before = snapshot(tmp_path)
    assert_user_error(run(*argv), *fragments, code=code, prefix=prefix)
    assert not (tmp_path / MARKER).exists(), "the pickle payload ran"
    assert snapshot(tmp_path) == before, "a failing command wrote or changed files"


def test_the_table_is_large_and_names_are_unique():
    assert len(CASES) >= 30
    assert len({case[0] for case in CASES}) == len(CASES)


def test_the_pickle_payload_is_live(tmp_path):
    """The payload the loader refuses really runs code when unpickled without weights_only."""
    evil_teacher(tmp_path)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / MARKER).exists()
