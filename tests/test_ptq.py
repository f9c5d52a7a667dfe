"""Baselines (#13): post-training quantization into a run that export takes, and the fp32 bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgekd import api
from edgekd.cli import main


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    """A float cnn-student trained on digits with `edgekd train` (6 epochs, a few seconds)."""
    root = tmp_path_factory.mktemp("float")
    metrics = api.train(api.TrainOptions(arch="cnn-student", epochs=6, progress=False), out=root / "float")
    return root / "float", metrics


@pytest.mark.parametrize("bits", [8, 4])
def test_ptq_keeps_the_float_accuracy_and_exports_exactly(float_model, tmp_path, bits):
    source, trained = float_model
    m = api.quantize(source, api.QuantizeOptions(weight_bits=bits, act_bits=bits), out=tmp_path / "ptq")
    assert m["method"] == "ptq" and m["student_float_accuracy"] == pytest.approx(trained["accuracy"], abs=1e-6)
    assert m["student_accuracy"] >= m["student_float_accuracy"] - 0.01  # within 1 point of float on digits
    assert m["calib_samples"] == 1024 and m["epochs"] == 0
    manifest = api.export(tmp_path / "ptq", "cpu", out=tmp_path / "bundle")
    assert manifest["parity"]["top1_agreement"] >= 0.999
    assert manifest["torch_accuracy"] == pytest.approx(m["student_accuracy"], abs=1e-6)
    assert manifest["fusion"]["float_compute"] == 0  # still every Conv/Gemm on int8 kernels


def test_bias_correction_and_calibration_size_are_recorded(float_model, tmp_path):
    source, _ = float_model
    m = api.quantize(source, api.QuantizeOptions(weight_bits=4, act_bits=4, calib_samples=64, bias_correction=False),
                     out=tmp_path / "ptq")
    on_disk = json.loads((tmp_path / "ptq" / "metrics.json").read_text())
    assert on_disk["calib_samples"] == 64 and on_disk["bias_correction"] is False and on_disk["format"]
    assert m["student_accuracy"] > 0.5


def test_fp32_bundle_of_the_runs_float_student(tiny_run, tmp_path):
    run_dir, metrics = tiny_run
    assert (run_dir / "float.pt").is_file()  # the float student QAT started from
    manifest = api.export(run_dir, "cpu", out=tmp_path / "fp32", float_model=True)
    assert manifest["format"] == "fp32" and manifest["weight_bits"] == 32 and manifest["quant"] is None
    assert manifest["parity"]["max_abs_diff"] < 1e-3 and manifest["parity"]["top1_agreement"] == 1.0
    assert manifest["torch_accuracy"] == pytest.approx(metrics["student_float_accuracy"], abs=1e-6)
    assert manifest["fusion"]["float_compute"] > 0  # float Conv/Gemm: nothing quantized
    [row] = api.bench([tmp_path / "fp32"], iterations=5, min_time_s=0.0, warmup=1, warmup_s=0.0)
    assert row["status"] == "ok" and row["format"] == "fp32"
    with np.load(tmp_path / "fp32" / "eval.npz") as f:
        assert len(f["y"]) == manifest["parity"]["n"]


def test_quantize_cli_and_its_errors(float_model, tmp_path, monkeypatch):
    source, _ = float_model
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["quantize", str(source), "--bits", "8", "--out", "p8", "-q"])
    assert result.exit_code == 0, result.output
    assert "PTQ accuracy" in result.output and (tmp_path / "p8" / "student.pt").is_file()
    result = runner.invoke(main, ["quantize", str(tmp_path), "--bits", "4"])  # a folder with no float model
    assert result.exit_code == 2 and "holds no float model" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["quantize", str(source), "--calib-samples", "0"])
    assert result.exit_code == 2 and "--calib-samples must be >= 1" in result.output
    result = runner.invoke(main, ["export", "p8", "--float"])  # a PTQ run keeps no float student
    assert result.exit_code == 2 and "holds no float student" in result.output
