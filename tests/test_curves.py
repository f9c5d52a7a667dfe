"""Training you can watch: metrics.csv and curves.png in every run dir (distill and train), the
loop's per-term losses, TensorBoard events as epochs finish, and what happens without the extras.

One tiny real teacher (train, 2 epochs) and one tiny distillation from it (1 float + 2 QAT epochs)
on digits, both with --tensorboard, are shared by the module."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekd import api
from edgekd.cli import main
from edgekd.training import curves

PNG = b"\x89PNG\r\n\x1a\n"


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("tensorboard")
    root = tmp_path_factory.mktemp("curves")
    cwd = os.getcwd()
    os.chdir(root)
    seen_live: list = []

    def log(line: str) -> None:  # at epoch 2's line, epoch 1's events must already be on disk
        if line.startswith("teacher epoch 2"):
            seen_live.append(_scalars(root / "tensorboard" / "teacher").get("loss/total"))

    try:
        teacher = api.train(api.TrainOptions(arch="cnn-student", epochs=2, progress=False), out=root / "teacher",
                            log=log, tensorboard=True)
        result = CliRunner().invoke(main, ["distill", "--bits", "4", "--epochs", "2", "--float-epochs", "1",
                                           "--teacher", teacher["path"], "--out", "runs/watch", "--tensorboard"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return root, result, seen_live


def test_distill_run_dir_has_one_row_per_epoch_and_phase(runs):
    root, _, _ = runs
    rows = _csv(root / "runs" / "watch" / "metrics.csv")
    assert [(r["phase"], r["segment"], r["epoch"], r["step"]) for r in rows] == \
        [("float", "1", "1", "1"), ("qat", "2", "1", "2"), ("qat", "2", "2", "3")]
    assert list(rows[0])[:7] == ["phase", "segment", "epoch", "step", "loss", "loss.kd", "loss.ce"]
    history = json.loads((root / "runs" / "watch" / "metrics.json").read_text())["history"]
    for row, h in zip(rows, history):
        # hinton: alpha * kd + (1 - alpha) * ce, the epoch means of the loop's per-term sums
        assert float(row["loss"]) == pytest.approx(0.9 * float(row["loss.kd"]) + 0.1 * float(row["loss.ce"]), rel=1e-4)
        assert h["losses"] == pytest.approx({"kd": float(row["loss.kd"]), "ce": float(row["loss.ce"])}, rel=1e-5)
        assert 0 <= float(row["train_accuracy"]) <= 1 and 0 <= float(row["val_accuracy"]) <= 1
        assert float(row["lr"]) > 0 and float(row["seconds"]) >= float(row["epoch_seconds"]) > 0
    assert {r["best"] for r in rows} <= {"0", "1"} and rows[0]["best"] == "1"


def test_distill_curves_png(runs):
    root, _, _ = runs
    png = (root / "runs" / "watch" / "curves.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 10_000


def test_teacher_dir_has_its_curves(runs):
    root, _, _ = runs
    rows = _csv(root / "teacher" / "metrics.csv")
    assert [(r["phase"], r["epoch"]) for r in rows] == [("teacher", "1"), ("teacher", "2")]
    assert "loss.ce" in rows[0]
    assert (root / "teacher" / "curves.png").read_bytes().startswith(PNG)


def test_tensorboard_events_are_written_as_epochs_finish(runs):
    root, result, seen_live = runs
    assert seen_live and [step for step, _ in seen_live[0]] == [1]  # before training ended
    teacher = _scalars(root / "tensorboard" / "teacher")
    assert [s for s, _ in teacher["loss/total"]] == [1, 2] and "loss/ce" in teacher
    events = _scalars(root / "runs" / "tensorboard" / "watch")
    rows = _csv(root / "runs" / "watch" / "metrics.csv")
    assert [s for s, _ in events["accuracy/val"]] == [1, 2, 3]
    for tag, column in (("loss/total", "loss"), ("loss/kd", "loss.kd"), ("accuracy/val", "val_accuracy"),
                        ("lr", "lr")):
        assert [v for _, v in events[tag]] == pytest.approx([float(r[column]) for r in rows], rel=1e-4)
    assert "tensorboard --logdir" in result.output


def test_without_tensorboard_one_error_line_before_any_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # find_spec now reports it absent
    monkeypatch.chdir(tmp_path)
    for args in (["train", "--epochs", "1", "--out", "t"], ["distill", "--epochs", "1", "--out", "d"]):
        result = CliRunner().invoke(main, [*args, "--tensorboard"])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "pip install 'edgekd[tensorboard]'" in errors[0]
        assert not re.search(r"epoch \d+: loss", result.output)  # no epoch was trained
    assert not (tmp_path / "runs" / "teachers").exists()  # distill did not train its teacher


def test_without_matplotlib_the_png_is_skipped_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    lines: list[str] = []
    history = [{"epoch": 1, "loss": 1.0, "train_accuracy": 0.5, "val_accuracy": 0.5, "lr": 1e-3, "seconds": 1.0}]
    written = curves.write_curves(tmp_path, history, lines.append, "teacher")
    assert written == [tmp_path / "metrics.csv"] and not (tmp_path / "curves.png").exists()
    assert lines == [curves.PLOT_HINT] and "pip install 'edgekd[plot]'" in lines[0]


def test_segments_start_on_a_new_phase_or_when_epochs_start_again():
    history = [dict(phase=p, epoch=e, loss=1.0, seconds=float(e)) for p, e in
               [("float", 1), ("float", 2), ("qat", 1), ("qat", 2), ("qat", 1), ("assistant", 1)]]
    rows = curves.epoch_rows(history)
    assert [r["segment"] for r in rows] == [1, 1, 2, 2, 3, 4]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch_seconds"] for r in rows] == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert curves.epoch_rows([{"epoch": 1, "loss": 0.5}], "teacher")[0]["phase"] == "teacher"
    text = curves.metrics_csv(curves.epoch_rows([{"epoch": 1, "loss": 0.5, "losses": {"ce": 0.5}}]))
    assert text.splitlines()[0].startswith("phase,segment,epoch,step,loss,loss.ce,train_accuracy")


def test_a_validation_drop_below_the_phase_best_is_logged_as_a_warning():
    from edgekd.training import schemes

    lines = []
    run = schemes.Run(opts=None, data=None, spec=None, new_objective=lambda: None, teacher=None, log=lines.append)
    on_epoch = schemes._epoch_logger(run, "W2A2", "qat")
    for epoch, val in enumerate([0.70, 0.74, 0.68, 0.47, 0.76], start=1):
        on_epoch({"epoch": epoch, "loss": 1.0, "train_accuracy": 0.5, "val_accuracy": val, "seconds": 1.0})
    warnings = [s for s in lines if s.startswith("warning:")]
    # 0.68 is 6 points below 0.74 (not logged); 0.47 is 27 below it
    assert warnings == ["warning: W2A2 val acc 0.4700 is 27.0 points below its best (0.7400, epoch 2): training is "
                        "unstable; the best epoch's weights are what the run keeps. A lower learning rate (--qat-lr) "
                        "usually steadies it"]
    assert [r["phase"] for r in run.history] == ["qat"] * 5
