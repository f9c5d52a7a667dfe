"""The CLI end to end on digits (CliRunner in a temp dir), and every bad input of the foundation:
one line on stderr, exit code 2, no traceback."""

import json
import pickle

import pytest
import torch
from click.testing import CliRunner

from edgekd.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error")]
    # One error line, last; anything before it is a labelled pre-flight note (info:/warning:).
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert all(line.startswith(("info:", "warning:", "error:")) for line in lines), result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def pipeline(workdir):
    """distill -> export -> bench with no paths, as the README's quickstart (small budget)."""
    import os

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        distill = run("distill", "--bits", 8, "--epochs", 2, "--float-epochs", 2, "--teacher-epochs", 2, "-q")
        export = run("export", "--target", "cpu")
        bench = run("bench", "--iterations", 20, "--warmup", 2, "--min-time", 0, "--json", "bench.json")
        return distill, export, bench, json.loads((workdir / "bench.json").read_text())
    finally:
        os.chdir(cwd)


def test_quickstart_chain(pipeline, workdir):
    distill, export, bench, rows = pipeline
    assert distill.exit_code == 0, distill.output
    assert export.exit_code == 0, export.output
    assert bench.exit_code == 0, bench.output
    metrics = json.loads(next((workdir / "runs").glob("*/metrics.json")).read_text())
    for key in ("teacher_accuracy", "student_accuracy", "weight_bits", "act_bits", "method", "epochs", "dataset",
                "history"):
        assert key in metrics
    assert metrics["weight_bits"] == 7  # onnxruntime-cpu declares reduce_range (x86 int8 saturation)
    assert "reduce_range" in distill.stderr or "reduce_range" in distill.output
    (row,) = rows
    assert row["status"] == "ok" and row["source"] == "measured"
    manifest = json.loads(next((workdir / "bundles").glob("*/manifest.json")).read_text())
    assert row["accuracy"] == pytest.approx(manifest["runtime_accuracy"], abs=1e-9)
    assert row["latency_ms"]["p50"] > 0


def test_teacher_is_reused(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    result = run("distill", "--bits", 4, "--epochs", 1, "--float-epochs", 1, "--teacher-epochs", 2,
                 "--out", "runs/again")
    assert result.exit_code == 0, result.output
    assert "reusing teacher" in result.stderr


def test_train_command(tmp_path):
    result = run("train", "--epochs", 1, "--arch", "cnn-student", "--out", tmp_path / "t", "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t" / "model.pt").is_file() and "test accuracy" in result.output


# ---- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, fragments", [
    (["distill", "--data", "digts"], ["unknown dataset 'digts'", "did you mean 'digits'"]),
    (["distill", "--student", "cnn-studnt"], ["unknown model 'cnn-studnt'", "did you mean 'cnn-student'"]),
    (["distill", "--student", "torchvision:resnet19"], ["unknown torchvision model 'resnet19'"]),
    (["distill", "--bits", "9"], ["--bits must be between 2 and 8, got 9"]),
    (["distill", "--bits", "1"], ["--bits must be between 2 and 8, got 1"]),
    (["distill", "--act-bits", "12"], ["--act-bits must be between 2 and 8"]),
    (["distill", "--target", "jetsn"], ["unknown target 'jetsn'", "did you mean 'jetson'"]),
    (["distill", "--method", "hintn"], ["did you mean 'hinton'"]),
    (["distill", "--teacher", "missing/teacher.pt"], ["teacher checkpoint not found"]),
    (["distill", "--data", "npz:nothing.npz"], ["dataset file not found"]),
    (["distill", "--data", "fashion-mnist:/nonexistent"], ["Fashion-MNIST file", "apt-get install"]),
    (["export", "no_such_run"], ["is not a run directory"]),
    (["export"], ["no distilled run found"]),
    (["bench"], ["no bundle found"]),
    (["bench", "--profile", "rpi6", "x"], ["did you mean"]),
    (["distill", "--epochs", "0"], ["Invalid value for '--epochs'", "distill --help"]),
    (["distill", "--bitz", "4"], ["No such option '--bitz'", "'--bits'"]),
    (["export", "--target"], ["Option '--target' requires an argument"]),
    (["targets", "show", "tensorrt-int9"], ["did you mean 'tensorrt-int8'"]),
])
def test_bad_input(args, fragments, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(run(*args), *fragments)


def _save(path, model, num_classes, input_shape=(1, 8, 8), arch="cnn-teacher"):
    from edgekd.models import save_checkpoint

    meta = {"arch": arch, "num_classes": num_classes, "input_shape": list(input_shape), "dataset": "digits",
            "seed": 0, "classes": [str(i) for i in range(num_classes)], "normalization": {"mean": [0], "std": [1]}}
    save_checkpoint(path, model.state_dict(), meta)


def test_teacher_with_other_class_count(tmp_path, monkeypatch):
    from edgekd.models import build_model

    monkeypatch.chdir(tmp_path)
    _save(tmp_path / "t5.pt", build_model("cnn-teacher", 5, (1, 8, 8)), 5)
    assert_user_error(run("distill", "--teacher", "t5.pt"), "predicts 5 classes but the dataset has 10")


def test_checkpoint_that_does_not_fit(tmp_path, monkeypatch):
    from edgekd.models import build_model

    monkeypatch.chdir(tmp_path)
    _save(tmp_path / "wrong.pt", build_model("cnn-student", 10, (1, 8, 8)), 10, arch="cnn-teacher")
    assert_user_error(run("distill", "--teacher", "wrong.pt"), "does not fit the architecture")


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_payload_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    result = run("distill", "--teacher", "evil.pt")
    assert_user_error(result, "refusing to load evil.pt")
    assert "pwned" not in result.output and "pwned" not in capsys.readouterr().out
