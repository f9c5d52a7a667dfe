"""edgekd sweep: cells produced, resume, failure isolation, Pareto and best-under-budget choice,
and the accuracy-path columns of the bench table.

One real sweep on digits (bits 8 and 4, QAT only, 1 epoch: no teacher to train) is shared by the
module; everything after it reuses its cells, with the training/export/bench functions replaced
by ones that raise, so that any redone stage would show."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
from click.testing import CliRunner

from edgekd import bench
from edgekd.bench import report
from edgekd.pipeline import deploy, sweep
from edgekd.pipeline import distill as distill_stage
from edgekd.catalog import BenchSettings, Budgets
from edgekd.cli import main
from edgekd.core.errors import EdgekdError

FAST = BenchSettings(threads=1, warmup=1, warmup_s=0.0, iterations=5, min_time_s=0.0, batch_sizes=(1,))
OPTS = dict(bits=(8, 4), methods=("none",), epochs=1, float_epochs=0, teacher_epochs=1)
CLI_ARGS = ["--bits", "8,4", "--methods", "none", "--epochs", "1", "--float-epochs", "0", "--teacher-epochs", "1"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        lines: list[str] = []
        result = sweep.run_sweep(sweep.SweepOptions(root=root / "sw", **OPTS), log=lines.append, settings=FAST)
    finally:
        os.chdir(cwd)
    return result, lines


def _forbid_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a finished stage was redone")

    monkeypatch.setattr(distill_stage, "distill", boom)
    monkeypatch.setattr(deploy, "export", boom)
    monkeypatch.setattr(bench, "bench_bundle", boom)


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_every_cell_is_distilled_exported_and_benched(swept):
    result, lines = swept
    assert [r["cell"] for r in result.rows] == ["bits8-none", "bits4-none"]
    assert all(r["status"] == "ok" and r["accuracy"] is not None for r in result.rows)
    assert [(r["weight_bits"], r["act_bits"]) for r in result.rows] == [(7, 8), (4, 4)]  # cpu: reduce_range
    for cell in ("bits8-none", "bits4-none"):
        assert (result.root / "runs" / cell / "metrics.json").is_file()
        assert (result.root / "bundles" / cell / "manifest.json").is_file()
        assert (result.root / "bench" / "default" / f"{cell}.json").is_file()
    assert sum(r["best"] for r in result.rows) == 1 and result.pareto
    assert all(r["pareto"] == (r in result.pareto) for r in result.rows)
    assert not any("reusing" in line for line in lines)


def test_each_cell_run_dir_has_its_curves(swept):
    """Each cell's run dir (distill's) carries metrics.csv and curves.png, one row per QAT epoch."""
    import csv

    result, _ = swept
    for cell in ("bits8-none", "bits4-none"):
        run = result.root / "runs" / cell
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        assert [(r["phase"], r["epoch"]) for r in rows] == [("qat", "1")]  # OPTS: no float epochs, 1 QAT epoch
        assert "loss.ce" in rows[0] and 0 <= float(rows[0]["val_accuracy"]) <= 1
        if importlib.util.find_spec("matplotlib") is not None:
            assert (run / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_resume_redoes_nothing(swept, monkeypatch, tmp_path):
    result, _ = swept
    before = _mtimes(result.root)
    _forbid_work(monkeypatch)
    lines: list[str] = []
    again = sweep.run_sweep(sweep.SweepOptions(root=result.root, **OPTS), log=lines.append, settings=FAST)
    assert [r["status"] for r in again.rows] == ["ok", "ok"]
    assert [r["accuracy"] for r in again.rows] == [r["accuracy"] for r in result.rows]
    assert sum("reusing" in line for line in lines) == 6  # 2 cells x (run, bundle, bench rows)
    assert _mtimes(result.root) == before


def test_a_failing_cell_does_not_stop_the_others(swept, monkeypatch, tmp_path):
    result, _ = swept
    root = tmp_path / "sw"
    shutil.copytree(result.root, root)
    shutil.rmtree(root / "bundles" / "bits4-none")
    (root / "bench" / "default" / "bits4-none.json").unlink()
    _forbid_work(monkeypatch)

    def export_fails(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(deploy, "export", export_fails)
    out = sweep.run_sweep(sweep.SweepOptions(root=root, **OPTS), settings=FAST)
    ok, failed = out.rows
    assert ok["cell"] == "bits8-none" and ok["status"] == "ok" and ok["best"]
    assert failed["cell"] == "bits4-none" and failed["status"] == "error"
    assert failed["error"] == "export: RuntimeError: boom"
    assert failed["torch_accuracy"] is not None  # what distill measured is still shown
    assert not failed["pareto"] and not (root / "bench" / "default" / "bits4-none.json").exists()
    assert "bits4-none: error: export: RuntimeError: boom" in report.render_table(out.rows)


def test_an_invalid_bit_width_is_refused_before_any_cell(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # was: an error row per bad cell (tests/test_safety_config.py: every list)
    _forbid_work(monkeypatch)
    with pytest.raises(EdgekdError, match="every bit width of --bits must be between 2 and 8, got 9"):
        sweep.run_sweep(sweep.SweepOptions(root=tmp_path / "sw", **(OPTS | {"bits": (8, 9)})), settings=FAST)
    assert not (tmp_path / "sw").exists()


def test_resume_with_other_training_options_is_refused(swept, monkeypatch):
    result, _ = swept
    _forbid_work(monkeypatch)
    with pytest.raises(EdgekdError, match=r"epochs 1 -> 2"):
        sweep.run_sweep(sweep.SweepOptions(root=result.root, **(OPTS | {"epochs": 2})), settings=FAST)


def test_cli_prints_table_summary_and_writes_files(swept, monkeypatch, tmp_path):
    result, _ = swept
    _forbid_work(monkeypatch)
    monkeypatch.setattr(bench, "resolve_settings", lambda *a, **k: FAST)
    res = CliRunner().invoke(main, ["sweep", *CLI_ARGS, "--out", str(result.root), "-q",
                                    "--json", str(tmp_path / "s.json"), "--markdown", str(tmp_path / "s.md")])
    assert res.exit_code == 0, res.output
    header = res.stdout.splitlines()[0].split()
    assert header[:4] == ["bundle", "pareto", "best", "status"]
    assert "Pareto set at batch 1" in res.stdout and "best: bits" in res.stdout
    rows = json.loads((tmp_path / "s.json").read_text())
    assert [r["cell"] for r in rows] == ["bits8-none", "bits4-none"] and sum(r["best"] for r in rows) == 1
    assert "| bundle | pareto | best |" in (tmp_path / "s.md").read_text()


def test_cli_rejects_bad_bits_list():
    res = CliRunner().invoke(main, ["sweep", "--bits", "8,x"])
    assert res.exit_code == 2 and "comma-separated integers" in res.stderr


# --- choosing, on known inputs ------------------------------------------------------------------------

def row(name, acc, p50, size, status="ok", batch=1):
    return {"bundle": name, "cell": name, "status": status, "accuracy": acc, "size_mb": size, "batch_size": batch,
            "latency_ms": {"p50": p50}}


def test_pareto_front_on_known_points():
    rows = [row("a", 0.90, 1.0, 0.10),  # most accurate
            row("b", 0.85, 0.5, 0.05),  # faster and smaller
            row("c", 0.80, 0.6, 0.06),  # dominated by b
            row("d", 0.80, 0.4, 0.08),  # fastest: kept
            row("e", 0.70, 0.5, 0.01),  # smallest: kept (size counts)
            row("f", 0.95, 0.1, 0.01, status="error"),  # not measured: never in the set
            row("g", 0.99, 0.1, 0.01, batch=8)]  # another batch size
    assert [r["bundle"] for r in sweep.pareto_front(rows, batch_size=1)] == ["a", "b", "d", "e"]
    assert [r["bundle"] for r in sweep.pareto_front(rows)] == ["g"]
    twins = [row("x", 0.9, 1.0, 0.1), row("y", 0.9, 1.0, 0.1)]
    assert len(sweep.pareto_front(twins)) == 2  # equal points do not dominate each other


def test_best_under_budget_on_known_rows():
    rows = [row("over", 0.95, 9.0, 0.1, status="fail"),  # most accurate but over a budget
            row("slow", 0.90, 2.0, 0.1), row("fast", 0.90, 1.0, 0.2), row("small", 0.90, 1.0, 0.1),
            row("worse", 0.80, 0.5, 0.1), row("broken", 0.99, 0.1, 0.1, status="error")]
    assert sweep.best_under_budget(rows)["bundle"] == "small"  # accuracy, then p50, then size
    assert sweep.best_under_budget(rows[:1]) is None


def test_summary_names_pareto_set_and_best():
    rows = [row("a", 0.9, 1.0, 0.1), row("b", 0.8, 2.0, 0.2, status="fail")]
    for r in rows:
        r.update(weight_bits=4, act_bits=4)
    result = sweep.SweepResult(root=None, rows=rows, pareto=sweep.pareto_front(rows, 1),
                               best=sweep.best_under_budget(rows), batch_size=1, budgets=Budgets(latency_ms=1.5))
    text = "\n".join(sweep.summary(result))
    assert "a (W4A4, batch 1): accuracy 90.00%, p50 1 ms, 0.1 MB" in text and "b (" not in text
    assert "meets every budget" in text
    result.best = None
    assert sweep.summary(result)[-1] == "best: no configuration meets the profile's budgets"


# --- the accuracy path in the bench table -------------------------------------------------------------

def test_table_shows_where_accuracy_went():
    r = bench.Row(bundle="q", path="q", weight_bits=4, act_bits=4, batch_size=1, teacher_accuracy=0.95,
                  student_float_accuracy=0.92, torch_accuracy=0.9025, accuracy=0.9, deploy_delta=-0.0025)
    md = report.render_markdown([r])
    header, _, body = ([c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()[:3])
    cells = dict(zip(header, body))
    assert header.index("teacher %") < header.index("float %") < header.index("torch %") < header.index("acc %")
    assert [cells[k] for k in ("teacher %", "float %", "torch %", "acc %")] == ["95.00", "92.00", "90.25", "90.00"]
    assert [cells[k] for k in ("KD pp", "quant pp", "deploy pp")] == ["-3.00", "-1.75", "-0.25"]
    assert "teacher %" in report.render_table([r]).splitlines()[0]
    assert report.ACCURACY_LEGEND in md


def test_unknown_accuracies_show_a_dash():
    r = bench.Row(bundle="q", path="q", torch_accuracy=0.9, accuracy=0.9)  # no teacher (method none), no float phase
    assert report._pp(r.to_dict(), "student_float_accuracy", "teacher_accuracy") == "-"
    assert report._pp(r.to_dict(), "accuracy", "torch_accuracy") == "+0.00"
    assert report.ACCURACY_LEGEND not in report.render_table([bench.Row(bundle="e", path="e", status="error")])


def test_extra_columns_and_footer():
    extra = (report.Column("mark", lambda r: "*", numeric=False),)
    text = report.render_table([bench.Row(bundle="q", path="q")], extra, footer=["the footer"])
    assert text.splitlines()[0].split()[:3] == ["bundle", "mark", "status"]
    assert "\nthe footer\n" in text


def test_plot_with_pareto_line_and_wide_latency_range(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(row("a", 0.9, 0.05, 0.1), weight_bits=8, act_bits=8), dict(row("b", 0.8, 0.04, 0.05)),
            row("broken", None, None, None, status="error")]
    path = report.plot(rows, tmp_path / "p.png", Budgets(latency_ms=5.0, min_accuracy=0.85), title="sweep",
                       front=rows)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- baselines and seeds (#13): ptq and the fp32 reference beside QAT, over seeds ----------------------

def test_ptq_and_the_fp32_reference_beside_qat_over_two_seeds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    opts = sweep.SweepOptions(root=tmp_path / "sw", bits=(8, 4), methods=("none", "ptq"), epochs=1, float_epochs=1,
                              seeds=(0, 1), reference=True)
    result = sweep.run_sweep(opts, log=lines.append, settings=FAST)
    names = [r["cell"] for r in result.rows]
    assert names == ["bits8-none-s0", "bits4-none-s0", "bits8-ptq-s0", "bits4-ptq-s0", "fp32-s0",
                     "bits8-none-s1", "bits4-none-s1", "bits8-ptq-s1", "bits4-ptq-s1", "fp32-s1"]
    assert all(r["status"] == "ok" for r in result.rows), [r.get("error") for r in result.rows]
    by = {r["cell"]: r for r in result.rows}
    # the float phase is trained once per (method, seed) and shared: the same float student everywhere
    assert "bits4-none-s0: QAT starts from the float student of bits8-none-s0" in lines
    float8 = json.loads((tmp_path / "sw" / "runs" / "bits8-none-s0" / "metrics.json").read_text())
    float4 = json.loads((tmp_path / "sw" / "runs" / "bits4-none-s0" / "metrics.json").read_text())
    assert float4["student_float_accuracy"] == pytest.approx(float8["student_float_accuracy"])
    # ptq quantizes that float student; fp32 exports it unquantized
    ptq = json.loads((tmp_path / "sw" / "runs" / "bits4-ptq-s0" / "metrics.json").read_text())
    assert ptq["method"] == "ptq" and ptq["student_float_accuracy"] == pytest.approx(float8["student_float_accuracy"])
    assert by["fp32-s0"]["format"] == "fp32" and by["fp32-s0"]["torch_accuracy"] == pytest.approx(
        float8["student_float_accuracy"], abs=1e-6)
    assert by["bits8-none-s1"]["seed"] == 1 and by["bits8-ptq-s1"]["method"] == "ptq"
    lines = sweep.summary(result)
    assert lines[0] == "accuracy over seeds (mean, min..max):" and any("W4A4 ptq" in line for line in lines)
    assert any("W32A32 fp32" in line for line in lines)


def test_sweep_records_the_qat_epochs_each_bit_width_gets():
    assert sweep.SweepOptions(bits=(8, 4)).qat_epochs() == 4
    assert sweep.SweepOptions(bits=(8, 4, 2)).qat_epochs() == {"8": 4, "4": 4, "2": 12}
    assert sweep.SweepOptions(bits=(8, 2), epochs=3).qat_epochs() == 3
    assert sweep.SweepOptions(bits=(2,)).recipe()["epochs"] == 12


def test_sweep_records_hinton_qat_temperature_so_a_resume_cannot_mix_them(tmp_path):
    assert sweep.SweepOptions(bits=(8, 4, 2)).qat_temperature() == {"8": 4.0, "4": 4.0, "2": 1.0}
    assert sweep.SweepOptions(bits=(2,)).recipe()["qat_temperature"] == 1.0
    assert "qat_temperature" not in sweep.SweepOptions(bits=(2,), methods=("none", "ptq")).recipe()
    old = sweep.SweepOptions(bits=(2,)).recipe()
    del old["qat_temperature"]  # a root written before the QAT-phase temperature existed (trained at T=4)
    sweep.check_recipe(tmp_path, old)
    with pytest.raises(EdgekdError, match="qat_temperature None -> 1.0"):
        sweep.check_recipe(tmp_path, sweep.SweepOptions(bits=(2,)).recipe())
