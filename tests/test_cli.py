"""The CLI end to end on digits (CliRunner in a temp dir). Bad inputs: tests/test_bad_input.py."""

import json

import pytest
from click.testing import CliRunner

from edgekd.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


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


@pytest.mark.parametrize("bits, weight_bits, act_bits, epochs", [(None, 2, 8, 12), (None, 8, 3, 12), (4, 4, 4, 4),
                                                                 (None, 4, 8, 4)])
def test_default_qat_epochs_follow_the_lowest_bits(bits, weight_bits, act_bits, epochs):
    from edgekd.config.options import qat_epochs

    assert qat_epochs(None, weight_bits, act_bits) == epochs
    assert qat_epochs(5, weight_bits, act_bits) == 5  # given: kept


@pytest.mark.parametrize("given, method, loss, weight_bits, act_bits, expected", [
    (None, "hinton", None, 2, 2, 1.0), (None, "hinton", None, 8, 3, 1.0), (None, "hinton", None, 4, 4, 4.0),
    (2.5, "hinton", None, 2, 2, 2.5), (None, "none", None, 2, 2, None), (None, "dkd", None, 2, 2, None),
    (None, "hinton", [{"name": "hinton", "weight": 1.0}], 2, 2, None)])
def test_qat_temperature_defaults_to_one_at_low_bits_for_hinton_only(given, method, loss, weight_bits, act_bits,
                                                                     expected):
    from edgekd.config.options import DistillOptions, qat_temperature

    opts = DistillOptions(method=method, qat_temperature=given, loss=loss)
    assert qat_temperature(opts, weight_bits, act_bits) == expected


def test_qat_phase_hinton_term_computes_the_reference_loss_at_its_new_temperature():
    import torch
    import torch.nn.functional as F

    from edgekd.kd import Objective
    from edgekd.training.schemes import _qat_temperature

    objective, lines = Objective.single("hinton", temperature=4.0, alpha=0.9), []
    _qat_temperature(objective, 1.0, lines.append)
    assert lines == ["QAT: KD temperature 1 (float phase 4; --qat-temperature sets it)"]
    gen = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen), torch.randint(0, 5, (8,), generator=gen)
    total, _ = objective(s, t, y)
    p_t = F.softmax(t, dim=1)  # Hinton et al. 2015 at T = 1: KL(p_t || p_s) (times T^2 = 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s, dim=1))).sum(1).mean()
    assert torch.allclose(total, 0.9 * kl + 0.1 * F.cross_entropy(s, y), atol=1e-6)
    _qat_temperature(objective, None, lines.append)  # not hinton's phase default: nothing changes
    assert len(lines) == 1


def test_two_bit_distill_trains_twelve_qat_epochs_by_default(tmp_path):
    result = run("distill", "--bits", 2, "--method", "none", "--float-epochs", 0,
                 "--out", tmp_path / "w2", "-q")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "w2" / "metrics.json").read_text())
    assert metrics["epochs"] == 12
    assert [h["epoch"] for h in metrics["history"] if h.get("phase") == "qat"] == list(range(1, 13))
