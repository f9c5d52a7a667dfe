"""Safety round 2 (issue #21): bench and compile against hostile settings, manifests, output paths and names.

Every count bench takes is bounded (options table, profiles, the CPUs and memory of this machine);
SIGTERM stops bench within seconds; manifest fields outside their range are an error row naming the
field; two outputs never share a file and never replace an input; names cannot forge table rows;
``compile`` and ``bench`` import no torch on a real exported bundle (and export needs no onnxscript).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgekd import bench
from edgekd.bench import measure, report
from edgekd.catalog import load_profile
from edgekd.cli import render
from edgekd.core.errors import ConfigError
from tests.test_bench import FAST, invoke, make_bundle, write_profile

QUICK = ("--iterations", 2, "--min-time", 0, "--warmup-time", 0, "--warmup", 0, "--batch-size", 1)
ROOT = Path(__file__).resolve().parent.parent


def one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.output


def edited(path: Path, **edit) -> Path:
    """The bundle ``path`` with manifest fields replaced (the manifest is not among the hashed files)."""
    manifest = json.loads((path / "manifest.json").read_text()) | edit
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.fixture
def good(tmp_path):
    return make_bundle(tmp_path, "good", n=20, wrong=5, torch_accuracy=0.8)


# --- 1. every count is bounded; SIGTERM stops bench ----------------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (("--threads", 100000), "--threads must be between 0 and 1024, got 100000"),
    (("--iterations", 10**7), "--iterations must be between 1 and 1000000"),
    (("--warmup", 10**6), "--warmup must be between 0 and 100000"),
    (("--min-time", 1e6), "--min-time must be between 0 and 3600"),
    (("--warmup-time", 1e5), "--warmup-time must be between 0 and 600"),
    (("--batch-size", 100000), "every item of --batch-size must be between 1 and 4096"),
    (tuple(x for b in range(1, 18) for x in ("--batch-size", b)), "17 batch sizes given, at most 16"),
])
def test_bench_counts_over_their_bound_are_one_line_errors(tmp_path, good, args, fragment):
    result = invoke(good, *args, "--json", tmp_path / "rows.json")
    one_line_error(result, fragment)
    assert not (tmp_path / "rows.json").exists()


@pytest.mark.parametrize("key,value,fragment", [
    ("threads", "100000", "[bench]: threads must be between 0 and 1024, got 100000"),
    ("iterations", "100000000", "[bench]: iterations must be between 1 and 1000000"),
    ("min_time_s", "1e9", "[bench]: min_time_s must be between 0 and 3600"),
    ("batch_sizes", "[1, 1000000]", "every item of"),
    ("batch_sizes", str(list(range(1, 40))), "39 batch sizes given, at most 16"),
])
def test_profile_bench_counts_over_their_bound(tmp_path, good, key, value, fragment):
    profile = write_profile(tmp_path, "huge")
    text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", profile.read_text())
    profile.write_text(text)
    one_line_error(invoke(good, "--profile", profile), fragment)


def test_python_api_settings_are_checked_too():
    with pytest.raises(ConfigError, match="--threads must be between 0 and 1024"):
        bench.resolve_settings(None, threads=100000)
    with pytest.raises(ConfigError, match="unknown bench setting 'iteration'.*did you mean 'iterations'"):
        bench.resolve_settings(None, iteration=5)


def test_threads_beyond_the_cpus_here_are_cut_with_a_note(good):
    cpus = measure.available_cpus()
    settings = FAST.__class__(**{**FAST.__dict__, "threads": cpus + 1, "batch_sizes": (1,)})
    [row] = bench.bench_bundles([good], settings)
    assert row.status == "ok", row.error
    assert row.environment["intra_op_threads"] == cpus
    assert f"threads {cpus + 1} > the {cpus} CPUs available here: ran with {cpus}" in row.note


def test_timed_runs_are_capped_whatever_min_time_asks(monkeypatch):
    monkeypatch.setattr(measure, "MAX_TIMED_RUNS", 50)
    ticks = iter(range(10**6))
    seconds = measure.time_runs(lambda: None, 0, 0.0, 10, 1e9, clock=lambda: next(ticks) * 1e-6)
    assert len(seconds) == 50


def test_batch_whose_input_does_not_fit_in_memory_is_skipped(good, monkeypatch):
    sample = 1 * 2 * 2 * 4  # bytes of one eval sample (float32, shape 1x2x2)
    monkeypatch.setattr(measure, "available_memory", lambda: 4 * sample * 8)  # a quarter: 8 samples
    settings = FAST.__class__(**{**FAST.__dict__, "batch_sizes": (8, 9)})
    fits, too_big = bench.bench_bundles([good], settings)
    assert fits.status == "ok"
    assert too_big.status == "skipped" and too_big.latency_ms is None
    assert "batch size 9 needs" in too_big.note and "bench a smaller --batch-size" in too_big.note


def test_eval_samples_larger_than_memory_are_refused_before_loading(good, monkeypatch):
    import edgekd.bundle

    monkeypatch.setattr(edgekd.bundle, "available_memory", lambda: 100)
    [row] = bench.bench_bundles([good], FAST)
    assert row.status == "error" and "more than half of the" in row.error and "--eval-samples" in row.error


def _bench_process(tmp_path: Path, bundle: Path, prelude: str = "", *args) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys
        {prelude}
        from edgekd.cli import main
        main(sys.argv[1:])
    """)
    cmd = [sys.executable, "-c", code, "bench", str(bundle), "--json", str(tmp_path / "rows.json"), *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)


def _terminate_after(proc: subprocess.Popen, marker: str) -> tuple[int, str, float]:
    """Wait for ``marker`` on stderr, send SIGTERM, return (exit code, stderr, seconds to exit)."""
    seen = ""
    deadline = time.monotonic() + 60
    while marker not in seen and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    assert marker in seen, seen
    time.sleep(0.3)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, rest = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return proc.returncode, seen + rest, time.monotonic() - sent


def test_sigterm_stops_bench_promptly(tmp_path, good):
    proc = _bench_process(tmp_path, good, "", "--min-time", 600, "--iterations", 10)
    code, err, took = _terminate_after(proc, "benchmarking")
    assert code == 143, err
    assert took < 10
    assert [line for line in err.splitlines() if line.startswith("error")] == ["error: interrupted by SIGTERM"]
    assert "Traceback" not in err
    assert not (tmp_path / "rows.json").exists()


def test_sigterm_stops_bench_stuck_in_native_code(tmp_path, good):
    """The main thread inside one long native call that releases the GIL (as ONNX Runtime's session.run
    does) never runs Python's signal handler: modelled by a sleep with SIGTERM blocked in that thread, so
    that the kernel delivers it to another thread. The watcher of cli.stopping ends the process."""
    prelude = textwrap.dedent("""
        import signal, time
        import edgekd.cli.stopping, edgekd.bench.measure as m
        edgekd.cli.stopping.GRACE_S = 1.0
        def stuck(*a, **k):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            print("STUCK", file=sys.stderr, flush=True)
            time.sleep(600)
        m.time_runs = stuck
    """).replace("\n", "\n        ")
    proc = _bench_process(tmp_path, good, prelude, *QUICK)
    code, err, took = _terminate_after(proc, "STUCK")
    assert code == 143, err
    assert took < 10
    assert err.strip().splitlines()[-1] == "error: interrupted by SIGTERM"
    assert not (tmp_path / "rows.json").exists()


# --- 2. manifest fields out of range --------------------------------------------------------------------

@pytest.mark.parametrize("edit,fragment", [
    ({"weight_bits": -3}, "weight_bits must be between 1 and 32, got -3"),
    ({"act_bits": 1000}, "act_bits must be between 1 and 32, got 1000"),
    ({"torch_accuracy": 1e308}, "torch_accuracy must be between 0 and 1, got 1e+308"),
    ({"teacher_accuracy": math.nan}, "teacher_accuracy must be a number, got NaN"),
    ({"runtime_accuracy_full": -0.5}, "runtime_accuracy_full must be between 0 and 1"),
    ({"student_float_accuracy": math.inf}, "student_float_accuracy must be between 0 and 1, got inf"),
    ({"parity": {"n": 20, "top1_agreement": 7, "max_abs_diff": 0.0}}, "parity.top1_agreement must be between 0 and 1"),
    ({"parity": {"n": -5, "top1_agreement": 1.0, "max_abs_diff": 0.0}}, "parity.n must be between 0 and"),
    ({"parity": {"n": 20, "top1_agreement": 1.0, "max_abs_diff": -1.0}}, "parity.max_abs_diff must be >= 0"),
    ({"parity": {"n": 2.5, "top1_agreement": 1.0, "max_abs_diff": 0.0}}, "parity.n must be an integer"),
    ({"test_samples": -10}, "test_samples must be between 1 and"),
    ({"input_shape": [1, -2, 2]}, "input_shape must be a list of positive integers"),
    ({"name": "x" * 1000}, "name must be a string of at most 200 characters"),
    ({"name": {"a": 1}}, "name must be a string"),
    ({"fpga_estimates": [1, 2]}, "fpga_estimates must map profile names to tables"),
    ({"backend_options": "fast"}, "backend_options must be a table"),
])
def test_absurd_manifest_values_are_an_error_row_naming_the_field(tmp_path, good, edit, fragment):
    bad = edited(make_bundle(tmp_path, "bad"), **edit)
    rows = bench.bench_bundles([good, bad], FAST)
    assert {r.status for r in rows if r.bundle == "good"} == {"ok"}  # the other bundle still runs
    [row] = [r for r in rows if r.path == str(bad)]
    assert row.status == "error" and fragment in row.error, row.error
    result = invoke(good, bad, *QUICK, "--strict")
    assert result.exit_code == 1 and "corrupt bundle" in result.stdout


def test_estimate_numbers_must_be_finite_and_not_negative():
    measure._check_estimate({"profile": "kv260", "throughput_ips": 10.0, "bram_36k": 3})
    for bad in ({"bram_36k": -1}, {"macs": math.nan}, {"throughput_ips": 0}, {"latency_ms": "fast"}):
        with pytest.raises(bench.BundleError, match="estimate for kv260 has"):
            measure._check_estimate({"profile": "kv260", **bad})


def test_model_with_a_huge_fixed_batch_is_refused(tmp_path, monkeypatch):
    path = make_bundle(tmp_path, "fixed", batch=4096)
    monkeypatch.setattr(measure, "available_memory", lambda: 4096 * 16)  # a quarter holds 1024 samples
    [row] = bench.bench_bundles([path], FAST)
    assert row.status == "error" and "fixed batch dimension 4096 cannot be run here" in row.error


def test_session_config_a_model_asks_for_is_limited_to_what_export_stores(tmp_path, good):
    from edgekd.backends import onnxruntime as ortb

    ortb.with_session_config(good / "model.onnx", {"session.intra_op_thread_affinities": "1;2;3"})
    with pytest.raises(Exception, match="session settings edgekd never stores: session.intra_op_thread_affinities"):
        ortb.make_session(good / "model.onnx")


# --- 3. output paths --------------------------------------------------------------------------------------

@pytest.mark.parametrize("first,second,spelling", [
    ("--json", "--csv", "rows.out"), ("--csv", "--markdown", "./sub/../rows.out"), ("--json", "--markdown", "rows.out"),
])
def test_two_outputs_naming_one_file_is_an_error(tmp_path, good, monkeypatch, first, second, spelling):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    result = invoke(good, *QUICK, first, "rows.out", second, spelling)
    one_line_error(result, f"{first} and {second} name the same file")
    assert not (tmp_path / "rows.out").exists()


def test_hard_link_to_another_output_or_to_an_input_is_refused(tmp_path, good):
    assert invoke(good, *QUICK, "--json", tmp_path / "a.json").exit_code == 0
    os.link(tmp_path / "a.json", tmp_path / "b.json")
    one_line_error(invoke(good, *QUICK, "--json", tmp_path / "a.json", "--csv", tmp_path / "b.json", "--overwrite"),
                   "--json and --csv name the same file")
    os.link(good / "manifest.json", tmp_path / "m.md")
    before = (good / "manifest.json").read_bytes()
    one_line_error(invoke(good, *QUICK, "--markdown", tmp_path / "m.md", "--overwrite"), "is the input being read")
    assert (good / "manifest.json").read_bytes() == before


def test_output_equal_to_an_input_file_is_refused(tmp_path, good):
    profile = write_profile(tmp_path, "p")
    before = profile.read_text()
    one_line_error(invoke(good, *QUICK, "--profile", profile, "--csv", profile, "--overwrite"),
                   "is the input being read")
    assert profile.read_text() == before
    one_line_error(invoke(good, *QUICK, "--json", good / "manifest.json", "--overwrite"), "is the input being read")
    one_line_error(invoke(good, *QUICK, "--markdown", good / "eval.npz", "--overwrite"), "is the input being read")


# --- 4. names cannot forge rows -----------------------------------------------------------------------------

FORGERIES = ["evil\n| forged | ok | qdq | W8A8 | 1 |", "evil\rforged", "evil\x1b[2Jforged", "evil\u2028forged",
             "evil | forged | ok", "evil\u202eforged", "evil\\| forged", "evil\x85forged"]


def _md_cells(line: str) -> list[str]:
    """Cells of a GFM table row: split at pipes not escaped by a backslash (``\\\\`` escapes itself)."""
    cells, cell, i = [], "", 0
    body = line.strip()[1:-1]
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            cell += body[i:i + 2]
            i += 2
            continue
        if body[i] == "|":
            cells.append(cell)
            cell = ""
        else:
            cell += body[i]
        i += 1
    return cells + [cell]


@pytest.mark.parametrize("name", FORGERIES)
def test_a_bundle_name_cannot_forge_a_table_row(tmp_path, name):
    path = edited(make_bundle(tmp_path, "b"), name=name)
    result = invoke(path, *QUICK, "--markdown", tmp_path / "t.md", "--csv", tmp_path / "t.csv")
    assert result.exit_code == 0, result.output
    table = result.stdout.split("\n\n")[0].splitlines()
    assert len(table) == 3 and table[2].startswith("evil")  # header, rule, the one row
    assert all(ch.isprintable() for line in result.stdout.splitlines() for ch in line)
    assert not any(line.lstrip().startswith("forged") for line in result.stdout.splitlines())
    md = (tmp_path / "t.md").read_text().splitlines()
    rows = [line for line in md if line.startswith("|")]
    assert len(rows) == 3
    assert len(_md_cells(rows[2])) == len(_md_cells(rows[0]))
    assert all(ch.isprintable() for line in md for ch in line)
    with open(tmp_path / "t.csv", newline="") as f:  # the csv module quotes the name: it reads back whole
        assert list(csv.DictReader(f))[0]["bundle"] == name


def test_error_notes_and_catalog_tables_are_cleaned(tmp_path):
    rows = [bench.Row(bundle="x\ny", path="p", status="error", error="boom\nerror: forged")]
    text = report.render_table(rows)
    assert "x\\ny: error: boom\\nerror: forged" in text
    assert not any(line.startswith("error: forged") for line in text.splitlines())
    assert render.text("a\nb\x1b[31m") == "a\\nb\\x1b[31m"
    profile = write_profile(tmp_path, "p")
    profile.write_text(profile.read_text().replace('description = "test profile"',
                                                   'description = "nice\\nforged: line"'))
    lines = render.profile_detail(load_profile(str(profile)))
    assert lines[0] == "p  nice\\nforged: line"
    assert not any(line.startswith("forged") for line in lines)


def test_csv_cells_a_spreadsheet_would_run_are_neutralised():
    rows = [bench.Row(bundle="=HYPERLINK(\"x\")", path="+cmd", target="@sum", format="-x", note="-1.5")]
    [cells] = list(csv.DictReader(io.StringIO(report.render_csv(rows))))
    assert (cells["bundle"], cells["path"], cells["target"], cells["format"]) == \
        ("'=HYPERLINK(\"x\")", "'+cmd", "'@sum", "'-x")
    assert cells["note"] == "-1.5"


def test_plot_labels_are_drawn_as_written(tmp_path):
    pytest.importorskip("matplotlib")
    row = bench.Row(bundle="a$\\frac{$b\nc", path="p", weight_bits=8, act_bits=8, batch_size=1, size_mb=1.0,
                    accuracy=0.9, latency_ms={"p50": 1.0})
    assert report.plot([row], tmp_path / "p.png", title="t$\\undefined$").read_bytes()[:4] == b"\x89PNG"


# --- 5. compile and bench import no torch; export needs no onnxscript ---------------------------------------

BLOCKER = textwrap.dedent("""
    import sys
    BLOCKED = set(sys.argv[1].split(","))

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                print(f"BLOCKED {name}", file=sys.stderr, flush=True)
                raise ImportError(f"{name} is blocked in this test", name=name)

    sys.meta_path.insert(0, Blocker())
    from edgekd.cli import main
    main(sys.argv[2:])
""")


def run_blocked(blocked: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", BLOCKER, blocked, *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """A real bundle of the tiny run, exported in a process where onnxscript cannot be imported."""
    run_dir, _ = tiny_run
    root = tmp_path_factory.mktemp("exported")
    done = run_blocked("onnxscript,onnx_ir", "export", run_dir, "--target", "onnxruntime-cpu", "--out", root / "b",
                       "--eval-samples", 64, "-q", cwd=root)
    assert done.returncode == 0, done.stderr
    assert "BLOCKED" not in done.stderr
    return root / "b"


def test_export_needs_no_onnxscript(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["parity"]["top1_agreement"] >= 0.99


def test_bench_and_compile_import_no_torch(exported, tmp_path):
    blocked = "torch,torchvision,brevitas"
    done = run_blocked(blocked, "bench", exported, *QUICK, "--json", tmp_path / "rows.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "BLOCKED" not in done.stderr, done.stderr
    [row] = json.loads((tmp_path / "rows.json").read_text())
    assert row["status"] == "ok" and row["accuracy"] == pytest.approx(row["torch_accuracy"], abs=0.05)
    done = run_blocked(blocked, "compile", exported, cwd=tmp_path)
    assert "BLOCKED" not in done.stderr, done.stderr
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "only TensorRT bundles are compiled on the device" in done.stderr


# --- 6. dependencies ------------------------------------------------------------------------------------------

def test_declared_dependencies_match_the_imports():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=;!~ \[]", d, maxsplit=1)[0].lower() for d in deps}
    assert "pillow" in names  # edgekd.data.imagefolder imports PIL
    assert "onnxscript" not in names
    sources = "\n".join(p.read_text() for p in (ROOT / "edgekd").rglob("*.py"))
    assert re.search(r"^\s*(from|import) PIL", sources, re.M)
    assert not re.search(r"^\s*(from|import) onnxscript", sources, re.M)
