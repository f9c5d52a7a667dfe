"""edgekd bench: verification, timing statistics, accuracy, memory, budgets, outputs, CLI.

Bundles are built here from tiny ONNX graphs (onnx.helper), no torch. The model's logits are the
first K input features, so its argmax - and the accuracy on labels we choose - is known exactly.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgekd import bench
from edgekd.bench import report
from edgekd.catalog import BenchSettings, Budgets
from edgekd.cli import main
from edgekd.core.errors import MissingFileError

CLASSES = ["a", "b", "c"]
SHAPE = (1, 2, 2)
FAST = BenchSettings(threads=1, warmup=2, warmup_s=0.0, iterations=5, min_time_s=0.0, batch_sizes=(1, 4))
JSON_KEYS = {"bundle", "status", "source", "target", "format", "weight_bits", "act_bits", "batch_size",
             "latency_ms", "throughput_ips", "accuracy", "torch_accuracy", "deploy_delta", "size_mb",
             "peak_rss_mb", "environment", "budget", "error"}


# --- building bundles -----------------------------------------------------------------------------------

def first_features_model(path: Path, batch="N", shape=SHAPE) -> None:
    """logits = the first len(CLASSES) features of the flattened input (Flatten + Gemm)."""
    features = int(np.prod(shape))
    w = np.zeros((len(CLASSES), features), np.float32)
    w[np.arange(len(CLASSES)), np.arange(len(CLASSES))] = 1.0
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "first_features",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, *shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, len(CLASSES)])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(len(CLASSES), np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_bundle(root: Path, name: str = "good", n: int = 20, wrong: int = 0, torch_accuracy: float = 1.0,
                batch="N", shape=SHAPE, **manifest_overrides) -> Path:
    """A complete bundle whose runtime accuracy is exactly (n - wrong) / n."""
    path = root / name
    path.mkdir(parents=True)
    first_features_model(path / "model.onnx", batch, shape)
    x = np.random.default_rng(0).standard_normal((n, *shape)).astype(np.float32)
    y = np.argmax(x.reshape(n, -1)[:, :len(CLASSES)], axis=1).astype(np.int64)
    y[:wrong] = (y[:wrong] + 1) % len(CLASSES)
    np.savez(path / "eval.npz", x=x, y=y)
    manifest = {
        "name": name, "target": "onnxruntime-cpu", "backend": "onnxruntime", "format": "qdq",
        "model_file": "model.onnx", "weight_bits": 8, "act_bits": 8, "input_shape": list(shape),
        "input_name": "input", "classes": CLASSES, "normalization": {"mean": [0.0], "std": [1.0]},
        "torch_accuracy": torch_accuracy, "teacher_accuracy": 0.99, "student_float_accuracy": 0.97,
        "parity": {"n": n, "top1_agreement": 1.0, "max_abs_diff": 0.0},
        "files": {f: sha(path / f) for f in ("model.onnx", "eval.npz")}, "edgekd_version": "0.1.0",
    }
    manifest.update(manifest_overrides)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def write_profile(root: Path, name: str, **budgets) -> Path:
    lines = [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in budgets.items()]
    path = root / f"{name}.toml"
    path.write_text(textwrap.dedent("""\
        description = "test profile"
        targets = ["onnxruntime-cpu"]
        [bench]
        threads = 1
        warmup = 1
        warmup_s = 0.0
        iterations = 5
        min_time_s = 0.0
        batch_sizes = [1, 2]
        [budgets]
        """) + "\n".join(lines) + "\n")
    return path


@pytest.fixture
def good(tmp_path):
    return make_bundle(tmp_path, "good", n=20, wrong=5, torch_accuracy=0.8)


# --- statistics -----------------------------------------------------------------------------------------

def test_latency_stats_of_known_list():
    stats = bench.latency_stats(np.arange(1, 101) / 1e3)  # 1..100 ms
    assert stats["min"] == pytest.approx(1.0)
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p95"] == pytest.approx(95.05)
    assert stats["p99"] == pytest.approx(99.01)
    assert stats["std"] == pytest.approx(np.sqrt((100 ** 2 - 1) / 12))  # population std of 1..n


def test_latency_stats_interpolates_between_samples():
    stats = bench.latency_stats([0.004, 0.001, 0.003, 0.002])
    assert (stats["p50"], stats["p90"]) == (pytest.approx(2.5), pytest.approx(3.7))
    assert bench.throughput_ips(8, 4.0) == pytest.approx(2000.0)


class FakeClock:
    """A clock that moves only when the timed function runs (1 ms per call)."""

    def __init__(self):
        self.t, self.calls = 0.0, 0

    def __call__(self):
        return self.t

    def work(self):
        self.calls += 1
        self.t += 0.001


@pytest.mark.parametrize("warmup,warmup_s,iterations,min_time_s,calls,timed", [
    (3, 0.0, 5, 0.0, 8, 5),         # counts dominate
    (1, 0.0055, 1, 0.0, 7, 1),       # warm-up time dominates: 6 warm-up calls
    (0, 0.0, 1, 0.0105, 11, 11),     # timed duration dominates
])
def test_time_runs_needs_both_count_and_duration(warmup, warmup_s, iterations, min_time_s, calls, timed):
    clock = FakeClock()
    samples = bench.time_runs(clock.work, warmup, warmup_s, iterations, min_time_s, clock=clock)
    assert clock.calls == calls
    assert len(samples) == timed
    assert np.allclose(samples, 0.001)


# --- one bundle end to end ------------------------------------------------------------------------------

def test_accuracy_through_runtime_and_deploy_delta(good):
    rows = bench.bench_bundles([good], FAST)
    assert [(r.status, r.batch_size) for r in rows] == [("ok", 1), ("ok", 4)]
    row = rows[0]
    assert row.accuracy == pytest.approx(15 / 20)
    assert row.deploy_delta == pytest.approx(0.75 - 0.8)
    assert (row.teacher_accuracy, row.student_float_accuracy, row.eval_samples) == (0.99, 0.97, 20)
    assert row.size_mb == pytest.approx((good / "model.onnx").stat().st_size / 1e6)
    assert row.source == "measured" and row.timed_runs >= 5
    lat = row.latency_ms
    assert set(lat) == {"min", "mean", "p50", "p90", "p95", "p99", "std"}
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"]
    assert rows[1].throughput_ips == pytest.approx(4 / (rows[1].latency_ms["mean"] / 1e3))


def test_memory_and_environment_are_recorded(tmp_path):
    big = make_bundle(tmp_path, "big", n=4, shape=(1, 512, 512))  # a 3.1 MB weight matrix
    weight_mb = 3 * 512 * 512 * 4 / 1e6
    row = bench.bench_bundles([big], FAST)[0]
    assert row.peak_rss_mb > 1.0
    if Path("/proc/self/status").exists():
        assert row.peak_rss_scope == "bundle"
        assert row.peak_rss_increase_mb >= row.rss_increase_mb - 0.5  # a peak is not below what is kept
        # How much RSS grows depends on what the allocator already holds: in this long-lived pytest
        # process freed, still-resident memory from earlier tests can take the weights without new
        # pages. A fresh interpreter (as `edgekd bench` is) must show the weights as new pages.
        script = ("import json, sys; from edgekd import bench; from edgekd.catalog import BenchSettings; "
                  "s = BenchSettings(threads=1, warmup=1, warmup_s=0.0, iterations=3, min_time_s=0.0, "
                  "batch_sizes=(1,)); r = bench.bench_bundles([sys.argv[1]], s)[0]; "
                  "print(json.dumps([r.peak_rss_increase_mb, r.rss_increase_mb]))")
        out = subprocess.run([sys.executable, "-c", script, str(big)], capture_output=True, text=True,
                             check=True).stdout
        peak_increase, kept_increase = json.loads(out.strip().splitlines()[-1])
        assert peak_increase >= weight_mb  # loading held at least the weights
        assert peak_increase >= kept_increase - 0.5
    env = row.environment
    for key in ("cpu_model", "cpu_count", "onnxruntime_version", "providers_available", "providers_used",
                "intra_op_threads", "python", "platform", "machine", "edgekd_version"):
        assert key in env, key
    assert env["providers_used"] == ["CPUExecutionProvider"]
    assert env["intra_op_threads"] == 1


def test_fixed_batch_model_skips_larger_batches(tmp_path):
    path = make_bundle(tmp_path, "fixed", n=7, wrong=2, batch=1)
    rows = bench.bench_bundles([path], FAST)
    assert [(r.status, r.batch_size) for r in rows] == [("ok", 1), ("skipped", 4)]
    assert "fixed batch dimension of 1" in rows[1].note
    assert rows[1].latency_ms is None
    assert rows[0].accuracy == pytest.approx(5 / 7)  # evaluated one sample at a time


# --- verification and failure isolation -----------------------------------------------------------------

def test_corrupt_bundle_does_not_stop_the_good_one(tmp_path, good):
    bad = make_bundle(tmp_path, "bad")
    (bad / "manifest.json").write_text("{ not json")
    rows = bench.bench_bundles([bad, good], FAST)
    assert [r.status for r in rows] == ["error", "ok", "ok"]
    assert "not valid JSON" in rows[0].error
    assert rows[0].environment["cpu_count"] >= 1


@pytest.mark.parametrize("victim", ["model.onnx", "eval.npz"])
def test_tampered_file_is_an_error_row(tmp_path, victim):
    path = make_bundle(tmp_path)
    with open(path / victim, "ab") as f:
        f.write(b"\0")
    [row] = bench.bench_bundles([path], FAST)
    assert row.status == "error"
    assert "modified after export" in row.error and victim in row.error
    assert row.format == "qdq"  # what is known from the manifest is still shown


def test_missing_manifest_keys_and_non_bundle_dirs(tmp_path):
    incomplete = make_bundle(tmp_path, "incomplete")
    manifest = json.loads((incomplete / "manifest.json").read_text())
    del manifest["torch_accuracy"], manifest["files"]
    (incomplete / "manifest.json").write_text(json.dumps(manifest))
    empty = tmp_path / "empty"
    empty.mkdir()
    rows = bench.bench_bundles([incomplete, empty], FAST)
    assert [r.status for r in rows] == ["error", "error"]
    assert "lacks torch_accuracy, files" in rows[0].error
    assert "not a bundle" in rows[1].error


def test_model_that_disagrees_with_manifest_is_an_error(tmp_path):
    wrong_classes = make_bundle(tmp_path, "classes", classes=["a", "b"])
    wrong_input = make_bundle(tmp_path, "input", input_name="pixels")
    rows = bench.bench_bundles([wrong_classes, wrong_input], FAST)
    assert "expected [N, 2]" in rows[0].error
    assert "'pixels'" in rows[1].error


def test_unknown_backend_is_an_error_row_with_suggestion(tmp_path):
    path = make_bundle(tmp_path, backend="onnxruntim")
    [row] = bench.bench_bundles([path], FAST)
    assert row.status == "error" and "did you mean 'onnxruntime'" in row.error


def test_resolve_bundles(tmp_path, monkeypatch, good):
    assert bench.resolve_bundles([good / "manifest.json"]) == [good]
    with pytest.raises(MissingFileError, match="no such bundle"):
        bench.resolve_bundles([tmp_path / "nope"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingFileError, match="no bundle found") as info:
        bench.resolve_bundles([])
    assert "run `edgekd export` first" in info.value.one_line()
    older = make_bundle(tmp_path / "bundles", "older")
    newer = make_bundle(tmp_path / "bundles", "newer")
    os.utime(older / "manifest.json", (1, 1))
    assert bench.resolve_bundles([]) == [Path("bundles") / "newer"]
    assert newer.exists()


# --- budgets --------------------------------------------------------------------------------------------

def measured_row(**fields) -> bench.Row:
    base = dict(bundle="m", path="m", latency_ms={"p50": 3.0, "p90": 4.0, "p99": 9.0}, size_mb=0.5,
                peak_rss_mb=100.0, accuracy=0.95)
    base.update(fields)
    return bench.Row(**base)


def test_budget_verdicts_pass_and_fail():
    budgets = Budgets(latency_ms=4.0, latency_percentile="p90", size_mb=1.0, peak_rss_mb=50.0, min_accuracy=0.96)
    row = bench.apply_budgets(measured_row(), budgets)
    verdicts = {name: v["verdict"] for name, v in row.budget.items()}
    assert verdicts == {"latency_ms": "pass", "size_mb": "pass", "peak_rss_mb": "fail", "min_accuracy": "fail"}
    assert row.budget["latency_ms"] == {"limit": 4.0, "value": 4.0, "verdict": "pass", "percentile": "p90"}
    assert row.status == "fail"


def test_budgets_all_pass_keep_ok_and_percentile_is_respected():
    row = bench.apply_budgets(measured_row(), Budgets(latency_ms=5.0, latency_percentile="p90"))
    assert row.status == "ok" and row.budget["latency_ms"]["value"] == 4.0
    row = bench.apply_budgets(measured_row(), Budgets(latency_ms=5.0, latency_percentile="p99"))
    assert row.status == "fail" and row.budget["latency_ms"]["value"] == 9.0
    assert bench.apply_budgets(measured_row(), None).budget is None
    skipped = bench.apply_budgets(measured_row(status="skipped"), Budgets(size_mb=0.1))
    assert skipped.status == "skipped" and skipped.budget is None


def test_resolve_settings_overrides_profile_values():
    settings = bench.resolve_settings(None, threads=2, iterations=None, batch_sizes=(1, 16))
    assert (settings.threads, settings.iterations, settings.batch_sizes) == (2, BenchSettings().iterations, (1, 16))
    assert bench.resolve_settings(None, batch_sizes=()).batch_sizes == BenchSettings().batch_sizes


# --- CLI ------------------------------------------------------------------------------------------------

def invoke(*args):
    return CliRunner().invoke(main, ["bench", *map(str, args)])


def test_cli_strict_exit_codes(tmp_path, good):
    loose = write_profile(tmp_path, "loose", latency_ms=1e4, size_mb=10.0, min_accuracy=0.5)
    tight = write_profile(tmp_path, "tight", size_mb=1e-6)
    ok = invoke(good, "--profile", loose, "--strict")
    assert ok.exit_code == 0, ok.output
    assert "pass" in ok.stdout
    failed = invoke(good, "--profile", tight, "--strict", "--json", tmp_path / "t.json")
    assert failed.exit_code == 1
    rows = json.loads((tmp_path / "t.json").read_text())
    assert {r["status"] for r in rows} == {"fail"}
    assert rows[0]["budget"]["size_mb"]["verdict"] == "fail"
    assert "good (batch 1): fail: size_mb" in failed.stdout and "> 1e-06" in failed.stdout
    assert invoke(good, "--profile", tight).exit_code == 0  # without --strict failures are reported only


def test_cli_strict_counts_error_rows(tmp_path, good):
    broken = make_bundle(tmp_path, "broken")
    (broken / "model.onnx").write_bytes(b"garbage")
    args = (good, broken, "--iterations", 2, "--min-time", 0, "--warmup-time", 0, "--batch-size", 1)
    assert invoke(*args).exit_code == 0
    result = invoke(*args, "--strict")
    assert result.exit_code == 1
    assert "broken" in result.stdout and "modified after export" in result.stdout


def test_cli_no_bundle_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke()
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: no bundle found") and "edgekd export" in result.stderr
    assert "Traceback" not in result.output


def test_cli_missing_path_and_bad_option(tmp_path):
    missing = invoke(tmp_path / "nope")
    assert missing.exit_code == 2 and "no such bundle" in missing.stderr
    assert invoke("--threads", -1).exit_code == 2


def test_cli_output_files(tmp_path, good):
    profile = write_profile(tmp_path, "p", latency_ms=1e4, latency_percentile="p99")
    out = tmp_path / "out"
    result = invoke(good, "--profile", profile, "--batch-size", 1, "--batch-size", 3,
                    "--json", out / "b.json", "--csv", out / "b.csv", "--markdown", out / "b.md")
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "b.json").read_text())
    assert [r["batch_size"] for r in rows] == [1, 3]
    assert JSON_KEYS <= set(rows[0]) and rows[0]["profile"] == "p"
    assert {"p50", "p90", "p99"} <= set(rows[0]["latency_ms"])
    table = list(csv.DictReader(io.StringIO((out / "b.csv").read_text())))
    assert len(table) == 2
    for column in ("bundle", "status", "latency_ms.p50", "budget.latency_ms.verdict", "environment.cpu_model"):
        assert column in table[0], column
    assert float(table[1]["latency_ms.p50"]) == pytest.approx(rows[1]["latency_ms"]["p50"])
    md = (out / "b.md").read_text().splitlines()
    assert md[0].startswith("| bundle | status | format | bits | batch |")
    assert set(md[1]) <= set("|:-") and md[2].startswith("| good | ok | qdq | W8A8 | 1 |")
    assert len([line for line in md if line.startswith("| good")]) == 2


def test_cli_plot_without_matplotlib_fails_before_benchmarking(tmp_path, good, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec now reports it absent
    result = invoke(good, "--plot", tmp_path / "p.png", "--json", tmp_path / "b.json")
    assert result.exit_code == 2
    assert "pip install 'edgekd[plot]'" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "b.json").exists()


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_cli_plot_writes_png(tmp_path, good):
    profile = write_profile(tmp_path, "p", latency_ms=1.0, min_accuracy=0.7)
    result = invoke(good, "--profile", profile, "--plot", tmp_path / "p.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_runs_without_torch(tmp_path, good):
    """A subprocess where torch, torchvision, brevitas and matplotlib cannot be imported."""
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "torchvision", "brevitas", "matplotlib"):
            sys.modules[name] = None  # any import of these now raises ImportError
        from edgekd.cli import main
        code = main(["bench", {str(good)!r}, "--iterations", "3", "--min-time", "0", "--warmup-time", "0",
                     "--json", {str(tmp_path / 'nt.json')!r}], standalone_mode=False)
        heavy = [m for m in ("torch", "torchvision", "brevitas", "matplotlib", "onnx") if sys.modules.get(m)]
        print("EXIT", code, "HEAVY", heavy)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "EXIT 0 HEAVY []" in done.stdout
    rows = json.loads((tmp_path / "nt.json").read_text())
    assert rows[0]["status"] == "ok" and rows[0]["accuracy"] == pytest.approx(0.75)


# --- report rendering -----------------------------------------------------------------------------------

def test_table_shows_errors_and_estimated_rows():
    rows = [measured_row(bundle="q", format="qdq", weight_bits=4, act_bits=8, batch_size=1),
            bench.Row(bundle="x", path="x", status="error", error="boom"),
            dict(measured_row(bundle="fpga", format="qonnx", weight_bits=2, act_bits=2).to_dict(),
                 source="estimated")]
    text = report.render_table(rows)
    header = text.splitlines()[0]
    assert header.split()[:3] == ["bundle", "status", "source"]
    assert "W4A8" in text and "W2A2" in text and "estimated" in text
    assert "x: error: boom" in text
    assert "source" not in report.render_table(rows[:2]).splitlines()[0]


def test_bits_labels():
    assert report.bits_label({"format": "fp32", "weight_bits": None, "act_bits": None}) == "fp32"
    assert report.bits_label({"format": "qonnx", "weight_bits": 2, "act_bits": 4}) == "W2A4"
    assert report.bits_label({}) == "-"


def test_significant_digit_cells():
    assert [report._sig(v) for v in (0.022149, 1.2345, 17.04, 153.2, 0.0, None)] == \
        ["0.0221", "1.23", "17.0", "153", "0", "-"]


@pytest.mark.parametrize("edit,message", [
    ({"model_file": "../outside.onnx"}, "not a file name inside the bundle"),
    ({"files": ["model.onnx"]}, "files must map file names"),
    ({"input_shape": [1, "2", 2]}, "input_shape must be a list of positive integers"),
])
def test_manifest_values_are_checked(tmp_path, edit, message):
    path = make_bundle(tmp_path, **edit)
    [row] = bench.bench_bundles([path], FAST)
    assert row.status == "error" and message in row.error
