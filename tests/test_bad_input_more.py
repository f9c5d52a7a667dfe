"""More bad inputs (issue #10), in the style of tests/test_bad_input.py and with its helpers: each case
prepares files in a temp dir, runs the CLI there and checks one ``error:`` line holding every
fragment (and none of the ``absent`` texts), the exit code, no traceback, no payload marker, and
that nothing in the directory changed. Every case must answer within its deadline (60 s unless
said): a case that hangs fails instead.

- numbers are validated where they enter (finite, in range, the right type): target tolerances,
  profile budgets, recipe weights and parameters, --lr, -T, npz data, bench eval data;
- inputs that used to end in a traceback end in one line;
- messages name the option the user typed and the fix.

Bench isolates a broken bundle as an ``error`` row, so bench-row cases run with ``--strict``
(exit 1) and check the row's one ``b: error:`` line. No case may train (``no_training``).
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_bad_input import CASES as TABLE_CASES
from tests.test_bad_input import (
    MARKER,
    PROFILE_HEAD,
    TARGET_HEAD,
    Payload,
    assert_user_error,
    both,
    bundle,
    run,
    snapshot,
    text,
)
from tests.test_bench import make_bundle, sha
from tests.test_safety_paths import FAST_BENCH, TINY, chdir, deadline, strict_json

SWEEP = ["sweep", "--methods", "none", "--epochs", "1", "--float-epochs", "0", "--teacher-epochs", "1", "-q"]


# --- files the cases prepare -------------------------------------------------------------------------------

def raw(name: str, data: bytes):
    def setup(tmp: Path) -> None:
        (tmp / name).write_bytes(data)
    return setup


def directory(name: str):
    def setup(tmp: Path) -> None:
        (tmp / name).mkdir()
    return setup


X = np.random.default_rng(0).random((40, 8, 8)).astype(np.float32)
Y = np.arange(40) % 4


def npz(x=X, y=Y, **kwargs):
    """data.npz with arrays x and y (object arrays are pickled by numpy)."""
    def setup(tmp: Path) -> None:
        np.savez(tmp / "data.npz", x=x, y=y, **kwargs)
    return setup


def _with(a: np.ndarray, index, value) -> np.ndarray:
    a = a.copy()
    a[index] = value
    return a


def object_npz(tmp: Path) -> None:
    """x is an object array whose unpickling would create the marker file."""
    x = np.empty(len(Y), dtype=object)
    x[:] = [Payload(tmp / MARKER) for _ in range(len(Y))]
    np.savez(tmp / "data.npz", x=x, y=Y)


def eval_bundle(x=None, y=None, **manifest):
    """Bundle b whose eval.npz x / y are changed by ``x`` / ``y`` (its hash updated in the manifest)."""
    def setup(tmp: Path) -> None:
        path = make_bundle(tmp, "b", **manifest)
        if x is None and y is None:
            return
        with np.load(path / "eval.npz") as f:
            xs, ys = f["x"], f["y"]
        np.savez(path / "eval.npz", x=x(xs) if x else xs, y=y(ys) if y else ys)
        m = json.loads((path / "manifest.json").read_text())
        m["files"]["eval.npz"] = sha(path / "eval.npz")
        (path / "manifest.json").write_text(json.dumps(m))
    return setup


def first(value):
    return lambda a: _with(a, (0,) if a.ndim == 1 else (0, 0, 0, 0), value)


FPGA = {"backend": "qonnx", "format": "qonnx", "target": "qonnx-finn", "runtime_accuracy": 1.0,
        "fpga_estimates": {"kv260": {"throughput_ips": -1000.0, "latency_ms": -1.0, "method": "heuristic"}}}


def cached_teacher_dir() -> str:
    """Where distill looks for its default teacher (the default architecture and epochs, digits, seed 0)."""
    from edgekd.api import DEFAULT_TEACHER, teacher_dir
    from edgekd.config.options import default

    return str(teacher_dir("digits", DEFAULT_TEACHER, 0, default("teacher_epochs")))


def truncated_cached_teacher(tmp: Path) -> None:
    path = tmp / cached_teacher_dir() / "model.pt"
    path.parent.mkdir(parents=True)
    torch.save({"w": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:64])


TARGET_TOL = TARGET_HEAD + "[tolerance]\n"
PROFILE_BUDGETS = PROFILE_HEAD + "[budgets]\n"
BENCH_STRICT = ["bench", "b", "--strict", *FAST_BENCH]
ROW = "b: error:"


# --- your own model and data (issue #12) ----------------------------------------------------------------------

def tree(change=None, **kwargs):
    """A 3-class PNG tree t/ (tests.own_models.write_tree), then ``change(t)``."""
    def setup(tmp: Path) -> None:
        from tests.own_models import write_tree

        write_tree(tmp / "t", **kwargs)
        if change:
            change(tmp / "t")
    return setup


def own_weights(name: str, classes: int = 3, zero: bool = False):
    """tests.own_models' tiny_net (or zero_net) saved as a plain state_dict, as a training script would."""
    def setup(tmp: Path) -> None:
        from tests.own_models import tiny_net, zero_net

        torch.save((zero_net if zero else tiny_net)(classes, 1).state_dict(), tmp / name)
    return setup


def _corrupt_png(t: Path) -> None:
    (t / "train" / "bee" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)


MINE = "tests.own_models:tiny_net"
FOLDER = ["distill", "--data", "imagefolder:t", "--workers", "0"]


def case(name, setup, argv, fragments, code=2, prefix="error:", absent=(), seconds=60):
    return (name, setup, argv, fragments, {"code": code, "prefix": prefix, "absent": absent, "seconds": seconds})


CASES = [
    # --- numbers in catalog files -----------------------------------------------------------------------
    case("target-tolerance-nan", text("mine.toml", TARGET_TOL + "max_abs_diff = nan\n"),
         ["targets", "show", "mine.toml"], ["mine.toml", "max_abs_diff", "nan"]),
    case("target-tolerance-inf", text("mine.toml", TARGET_TOL + "max_abs_diff = inf\n"),
         ["distill", "--target", "mine.toml"], ["mine.toml", "max_abs_diff", "inf"]),
    case("target-tolerance-negative", text("mine.toml", TARGET_TOL + "max_abs_diff = -1.0\n"),
         ["check", "--target", "mine.toml"], ["mine.toml", "max_abs_diff", "-1"]),
    case("target-min-agreement-nan", text("mine.toml", TARGET_TOL + "min_top1_agreement = nan\n"),
         ["targets", "show", "mine.toml"], ["mine.toml", "min_top1_agreement", "nan"]),
    case("profile-latency-budget-nan", text("p.toml", PROFILE_BUDGETS + "latency_ms = nan\n"),
         ["profiles", "show", "p.toml"], ["p.toml", "latency_ms", "nan"]),
    case("profile-accuracy-budget-nan", text("p.toml", PROFILE_BUDGETS + "min_accuracy = nan\n"),
         ["profiles", "show", "p.toml"], ["p.toml", "min_accuracy", "nan"]),
    case("bench-profile-size-budget-nan", both(bundle("ort"), text("p.toml", PROFILE_BUDGETS + "size_mb = nan\n")),
         ["bench", "b", "--profile", "p.toml", *FAST_BENCH], ["p.toml", "size_mb", "nan"]),
    # --- numbers in recipes and options -------------------------------------------------------------------
    case("recipe-loss-weight-negative", text("r.toml", '[[loss]]\nname = "kd"\nweight = -1.0\n'),
         ["distill", "--config", "r.toml"], ["r.toml", "[[loss]] #1 'kd'", "weight", "-1"]),
    case("recipe-loss-weight-nan", text("r.toml", '[[loss]]\nname = "kd"\nweight = nan\n'),
         ["distill", "--config", "r.toml"], ["r.toml", "[[loss]] #1 'kd'", "weight", "nan"]),
    case("recipe-loss-weight-inf", text("r.toml", '[[loss]]\nname = "kd"\nweight = inf\n'),
         ["distill", "--config", "r.toml"], ["r.toml", "[[loss]] #1 'kd'", "weight", "inf"]),
    case("recipe-loss-param-nan", text("r.toml", '[[loss]]\nname = "dkd"\nbeta = nan\n'),
         ["distill", "--config", "r.toml"], ["beta", "nan"]),
    case("recipe-lr-nan", text("r.toml", "lr = nan\n"), ["distill", "--config", "r.toml"], ["r.toml", "lr", "nan"]),
    case("recipe-temperature-nan", text("r.toml", "temperature = nan\n"), ["distill", "--config", "r.toml"],
         ["r.toml", "temperature", "nan"]),
    case("recipe-10000-loss-terms", text("r.toml", '[[loss]]\nname = "ce"\n' * 10000), ["distill", "--config", "r.toml"],
         ["r.toml", "too many [[loss]] terms"], seconds=20),
    case("distill-lr-nan", None, ["distill", "--lr", "nan"], ["--lr", "nan"]),
    case("distill-lr-inf", None, ["distill", "--lr", "inf"], ["--lr", "inf"]),
    case("train-lr-nan", None, ["train", "--lr", "nan"], ["--lr", "nan"]),
    case("distill-temperature-zero", None, ["distill", "-T", "0"], ["temperature", "0"]),
    case("distill-temperature-nan", None, ["distill", "-T", "nan"], ["temperature", "nan"]),
    case("distill-digits-with-an-argument", None, ["distill", "--data", "digits:/no/such/dir"],
         ["digits:/no/such/dir", "takes no argument"]),
    # --- npz data -----------------------------------------------------------------------------------------
    case("npz-float-labels", npz(y=Y + 0.5), ["distill", "--data", "npz:data.npz"], ["data.npz", "integer"]),
    case("npz-one-class", npz(y=np.zeros(len(Y), np.int64)), ["distill", "--data", "npz:data.npz"],
         ["data.npz", "at least 2 classes"]),
    case("npz-nan-pixels", npz(x=_with(X, (3, 2, 2), np.nan)), ["distill", "--data", "npz:data.npz"],
         ["data.npz", "finite"]),
    case("npz-inf-pixels", npz(x=_with(X, (3, 2, 2), np.inf)), ["distill", "--data", "npz:data.npz"],
         ["data.npz", "finite"]),
    case("npz-one-sample", npz(x=X[:1], y=Y[:1]), ["distill", "--data", "npz:data.npz"], ["data.npz", "too few samples"]),
    case("npz-negative-labels", npz(y=Y - 1), ["distill", "--data", "npz:data.npz"], ["data.npz", "negative"]),
    case("npz-2d-labels", npz(y=Y[:, None]), ["distill", "--data", "npz:data.npz"], ["data.npz", "1-D"]),
    case("npz-object-arrays", object_npz, ["distill", "--data", "npz:data.npz"], ["data.npz", "object"]),
    case("npz-text-file", raw("data.npz", b"x,y\n0.1,1\n0.2,0\n"), ["distill", "--data", "npz:data.npz"],
         ["data.npz is not an npz file"]),
    case("npz-empty-file", raw("data.npz", b""), ["distill", "--data", "npz:data.npz"], ["data.npz", "empty"],
         absent=["aborted"]),
    case("npz-directory", directory("ddir"), ["distill", "--data", "npz:ddir"], ["ddir", "is a directory"],
         absent=["not found"]),
    case("teacher-directory", directory("t.pt"), ["distill", "--teacher", "t.pt"], ["t.pt", "is a directory"],
         absent=["not found"]),
    # --- bench rows: what cannot be checked is an error, not ok -----------------------------------------------
    case("bench-eval-nan-x", eval_bundle(x=first(np.nan)), BENCH_STRICT, ["eval.npz", "finite"], 1, ROW),
    case("bench-eval-complex-x", eval_bundle(x=lambda x: x.astype(np.complex64) * (1 + 1j)), BENCH_STRICT,
         ["eval.npz", "complex"], 1, ROW),
    case("bench-eval-label-99", eval_bundle(y=first(99)), BENCH_STRICT, ["eval.npz", "out of range"], 1, ROW),
    case("bench-eval-label-negative", eval_bundle(y=first(-1)), BENCH_STRICT, ["eval.npz", "out of range"], 1, ROW),
    case("bench-eval-label-huge", eval_bundle(y=first(10**12)), BENCH_STRICT, ["eval.npz", "out of range"], 1, ROW),
    case("bench-fpga-negative-throughput", eval_bundle(**FPGA), BENCH_STRICT, ["throughput_ips"], 1, ROW),
    case("bench-manifest-string-accuracy", eval_bundle(torch_accuracy="0.9"), BENCH_STRICT, ["torch_accuracy"], 1, ROW),
    case("bench-manifest-list-format", eval_bundle(format=["qdq"]), BENCH_STRICT, ["format"], 1, ROW),
    case("bench-manifest-numeric-backend", eval_bundle(backend=5), BENCH_STRICT, ["backend"], 1, ROW),
    # --- tracebacks that are one line now ----------------------------------------------------------------------
    case("distill-first-last-bits-superscript", None, ["distill", "--first-last-bits", "\u00b2"],
         ["--first-last-bits", "'same'"]),
    case("distill-negative-seed", None, ["distill", "--seed", "-1"], ["--seed", "-1"]),
    case("recipe-invalid-utf8", raw("r.toml", b"epochs = 3\n# caf\xe9 \xff\n"), ["distill", "--config", "r.toml"],
         ["r.toml", "UTF-8"]),
    case("target-file-invalid-utf8", raw("mine.toml", TARGET_HEAD.encode() + b"description = \"\xff\xfe\"\n"),
         ["targets", "show", "mine.toml"], ["mine.toml", "UTF-8"]),
    case("profile-file-invalid-utf8", raw("p.toml", PROFILE_HEAD.encode() + b"# \xc3\x28\n"),
         ["profiles", "show", "p.toml"], ["p.toml", "UTF-8"]),
    # --- messages ----------------------------------------------------------------------------------------------
    case("distill-weight-bits-0", None, ["distill", "--weight-bits", "0"],
         ["--weight-bits must be between 2 and 8, got 0"]),
    case("distill-act-bits-0", None, ["distill", "--act-bits", "0"], ["--act-bits must be between 2 and 8, got 0"]),
    case("distill-truncated-cached-teacher", truncated_cached_teacher, ["distill", "-q"], [cached_teacher_dir(), "delete"],
         absent=["pass a complete"]),
    # --- your own model and data (issue #12) ---------------------------------------------------------------------
    case("imagefolder-not-found", None, ["distill", "--data", "imagefolder:nowhere"], ["nowhere", "not found"]),
    case("imagefolder-no-folder", None, ["distill", "--data", "imagefolder"], ["imagefolder", "needs a folder"]),
    case("imagefolder-no-train", directory("t"), FOLDER, ["no train/ folder", "DIR/train/<class>/"]),
    case("imagefolder-mismatched-classes", tree(lambda t: (t / "test" / "bee").rename(t / "test" / "dog")), FOLDER,
         ["missing bee", "extra dog", "same class folders"]),
    case("imagefolder-empty-class", tree(lambda t: (t / "train" / "dog").mkdir()), FOLDER,
         ["train/dog holds no images"]),
    case("imagefolder-corrupt-image", tree(_corrupt_png), FOLDER, ["cannot read image", "3.png", "--skip-bad-images"]),
    case("imagefolder-mixed-sizes", tree(sizes=[10, 14]), FOLDER, ["2 different sizes", "--image-size N"]),
    case("normalize-unknown", None, ["distill", "--normalize", "zscore"], ["--normalize", "zscore", "MEAN/STD"]),
    case("normalize-wrong-channel-count", None, ["distill", "--normalize", "0.5,0.5/1,1"],
         ["2 means and 2 stds for 1-channel"]),
    case("normalize-zero-std", None, ["train", "--normalize", "0.5/0"], ["--normalize 0.5/0", "> 0"]),
    case("image-size-on-digits", None, ["distill", "--image-size", "32"], ["--image-size applies to image folders"]),
    case("augment-crop-on-digits", None, ["distill", "--augment", "crop+flip"], ["crop+flip", "--augment flip"]),
    case("channels-2", None, ["distill", "--channels", "2"], ["--channels", "2"]),
    case("workers-negative", None, ["distill", "--workers", "-1"], ["--workers", "-1"]),
    case("image-cache-unknown", None, ["distill", "--image-cache", "always"], ["--image-cache", "always"]),
    case("arch-equals-nothing", None, ["distill", "--teacher", "torchvision:resnet18="], ["needs both"]),
    case("teacher-weights-not-found", None, ["distill", "--teacher", "torchvision:resnet18=nope.pth"],
         ["nope.pth", "not found"]),
    case("student-weights-not-found", None, ["distill", "--student", "cnn-student=nope.pt"], ["nope.pt", "not found"]),
    case("teacher-weights-other-class-count", both(tree(), own_weights("five.pt", classes=5)),
         [*FOLDER, "--teacher", f"{MINE}=five.pt"], ["five.pt", "(5, 32) in the file, (3, 32) in the model",
                                                     "the class count"]),
    case("teacher-weights-other-architecture", both(tree(), own_weights("mine.pt")),
         [*FOLDER, "--teacher", "torchvision:resnet18=mine.pt"], ["mine.pt", "does not fit", "unexpected keys"]),
    case("train-arch-weights-other-architecture", both(tree(), own_weights("mine.pt")),
         ["train", "--data", "imagefolder:t", "--workers", "0", "--arch", "cnn-student=mine.pt", "--out", "o"],
         ["mine.pt", "does not fit"]),
    case("teacher-near-chance", both(tree(), own_weights("zero.pt", zero=True)),
         [*FOLDER, "--teacher", f"{MINE}=zero.pt", "--student", MINE],
         ["teacher zero.pt", "near chance", "normalization", "class order", "image size", "--force"]),
    case("export-eval-samples-0", None, ["export", "--eval-samples", "0"], ["--eval-samples", "0"]),
]


ROW_LINE = re.compile(r"^b( \(batch \d+\))?: error: ")  # a bench row's note: bundle-level or per batch size


def _check(result, fragments, code, prefix, absent):
    if prefix == ROW:  # bench's error row: one note line "b: error: ..." or "b (batch 1): error: ..."
        assert result.exit_code == code, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert "Traceback" not in result.output
        assert not [line for line in result.output.splitlines() if line.startswith("error:")], result.output
        rows = [line for line in result.output.splitlines() if ROW_LINE.match(line)]
        assert len(rows) == 1, result.output
        line = rows[0]
        for fragment in fragments:
            assert fragment in line, f"{fragment!r} not in {line!r}"
    else:
        assert_user_error(result, *fragments, code=code, prefix=prefix)
        line = next(line for line in result.output.splitlines() if line.startswith(prefix))
    for text_ in absent:
        assert text_ not in line, f"{text_!r} in {line!r}"


@pytest.mark.parametrize("setup, argv, fragments, kw", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input_more(setup, argv, fragments, kw, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if setup:
        setup(tmp_path)
    before = snapshot(tmp_path)
    with deadline(kw["seconds"]):
        result = run(*argv)
    _check(result, fragments, kw["code"], kw["prefix"], kw["absent"])
    assert not (tmp_path / MARKER).exists(), "a pickle payload ran"
    assert snapshot(tmp_path) == before, "a failing command wrote or changed files"


# --- cases that need a real distilled run ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A tiny cnn-student run on digits (QAT only, 1 epoch, 64 training samples), made once."""
    from edgekd import api

    root = tmp_path_factory.mktemp("bad-input-run")
    with chdir(root):
        api.distill(api.DistillOptions(**TINY), out=root / "run")
    return root / "run"


def metrics(content: str):
    def edit(run: Path) -> None:
        (run / "metrics.json").write_text(content)
    return edit


def meta(change):
    def edit(run: Path) -> None:
        ckpt = torch.load(run / "student.pt", weights_only=True)
        change(ckpt["meta"])
        torch.save(ckpt, run / "student.pt")
    return edit


RUN_CASES = [
    ("export-metrics-not-json", metrics('{"student_accuracy": 0.9'), ["run/metrics.json", "not valid JSON"]),
    ("export-metrics-not-an-object", metrics("[1, 2]"), ["run/metrics.json", "not a JSON object"]),
    ("export-meta-extra-quant-key", meta(lambda m: m["quant"].update(bogus=1)), ["run/student.pt", "bogus"]),
    ("export-meta-num-classes-string", meta(lambda m: m.update(num_classes="10")), ["run/student.pt", "num_classes"]),
    ("export-meta-no-normalization", meta(lambda m: m.pop("normalization")), ["run/student.pt", "normalization"]),
    ("export-meta-dataset-etc-passwd", meta(lambda m: m.update(dataset="npz:/etc/passwd")), ["/etc/passwd"]),
]


@pytest.mark.parametrize("edit, fragments", [pytest.param(*c[1:], id=c[0]) for c in RUN_CASES])
def test_bad_run_directory(edit, fragments, real_run, tmp_path, monkeypatch):
    shutil.copytree(real_run, tmp_path / "run")
    edit(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    with deadline(60):
        result = run("export", "run")
    assert_user_error(result, *fragments)
    assert snapshot(tmp_path) == before


def test_the_tables_are_large_and_names_are_unique():
    names = [c[0] for c in TABLE_CASES] + [c[0] for c in CASES] + [c[0] for c in RUN_CASES]
    assert len(TABLE_CASES) >= 84  # the table before issue #10 had 84 cases
    assert len(CASES) + len(RUN_CASES) >= 50
    assert len(set(names)) == len(names)


# --- JSON that edgekd writes is JSON -----------------------------------------------------------------------------

def test_bench_json_is_valid_json_when_a_manifest_holds_nan(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_bundle(tmp_path, "b", torch_accuracy=float("nan"))
    result = run("bench", "b", "--json", "rows.json", *FAST_BENCH)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    rows = strict_json((tmp_path / "rows.json").read_text())  # NaN is not JSON
    assert [r["bundle"] for r in rows] == ["b"]


# --- an unwritable report names the option, not --out ----------------------------------------------------------

def deny_writes_under(monkeypatch, folder: Path) -> None:
    """EACCES for anything created, opened for writing or renamed inside ``folder``: root ignores
    the folder's mode, so the denial is simulated (as test_resilience simulates ENOSPC)."""
    root = os.path.realpath(folder)

    def inside(p) -> bool:
        try:
            path = os.path.realpath(os.fsdecode(os.fspath(p)))
        except TypeError:
            return False
        return path == root or path.startswith(root + os.sep)

    def deny(p):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(os.fspath(p)))

    def wrap(module, name, writes):
        real = getattr(module, name)

        def guarded(*args, **kwargs):
            for p in writes(args, kwargs):
                if p is not None and inside(p):
                    deny(p)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, guarded)

    def write_mode(args, kwargs):
        mode = kwargs.get("mode", args[1] if len(args) > 1 else "r")
        return [args[0]] if isinstance(mode, str) and any(c in mode for c in "wax+") else []

    def write_flags(args, kwargs):
        flags = kwargs.get("flags", args[1] if len(args) > 1 else 0)
        return [args[0]] if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) else []

    def temp_dir(args, kwargs):
        return [kwargs.get("dir") or (args[2] if len(args) > 2 else None)]

    wrap(builtins, "open", write_mode)
    wrap(io, "open", write_mode)
    wrap(os, "open", write_flags)
    for name in ("mkdir", "replace", "rename", "link", "symlink"):
        wrap(os, name, lambda args, kwargs: list(args[:2]))
    for name in ("mkstemp", "mkdtemp", "NamedTemporaryFile"):
        wrap(tempfile, name, temp_dir)


def test_unwritable_report_says_permission_denied_without_suggesting_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_bundle(tmp_path, "b")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root
            deny_writes_under(monkeypatch, ro)
        before = snapshot(tmp_path)
        result = run("bench", "b", "--json", "ro/x.json", *FAST_BENCH)
    finally:
        ro.chmod(0o755)
    # bench may print its progress ("benchmarking b ...") before it writes: only the error line is checked
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert "permission denied" in errors[0] and "ro/x.json" in errors[0], errors[0]
    assert "--out" not in errors[0], errors[0]
    assert snapshot(tmp_path) == before


# --- sweep -----------------------------------------------------------------------------------------------------

def _distill_fails(*args, **kwargs):
    raise RuntimeError("distill fails")


def test_sweep_exits_1_when_every_cell_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (bits outside 2..8 are refused before any cell: tests/test_safety_config.py)
    monkeypatch.setattr("edgekd.pipeline.distill.distill", _distill_fails)
    result = run(*SWEEP, "--bits", "8,4", "--out", "sw")
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.exit_code == 1, result.output
    assert "bits8-none" in result.output and "bits4-none" in result.output


@pytest.mark.parametrize("cached", ['{"rows": 3}', "[1, 2]", '[{"status": "ok", "latency_ms": "fast", "accuracy": "high"}]',
                                    '"ok"'], ids=["object", "list-of-numbers", "wrong-types", "string"])
def test_sweep_redoes_or_reports_cached_bench_rows_of_the_wrong_shape(cached, real_run, tmp_path, monkeypatch):
    """A cached bench file that is not a list of rows is benched again (then rewritten) or gives the
    cell an error row naming the bench stage; it never crashes the sweep."""
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as m:  # the cell fails at once; the sweep records its options in sw/sweep.json
        m.setattr("edgekd.pipeline.distill.distill", _distill_fails)
        run(*SWEEP, "--bits", "8", "--out", "sw")
    assert (tmp_path / "sw" / "sweep.json").is_file()
    shutil.copytree(real_run, tmp_path / "sw" / "runs" / "bits8-none")
    exported = run("export", "sw/runs/bits8-none", "--out", "sw/bundles/bits8-none", "-q")
    assert exported.exit_code == 0, exported.output
    cache = tmp_path / "sw" / "bench" / "default" / "bits8-none.json"
    cache.parent.mkdir(parents=True)
    cache.write_text(cached)
    result = run(*SWEEP, "--bits", "8", "--out", "sw", "--json", "rows.json")
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    rows = strict_json((tmp_path / "rows.json").read_text())
    assert [r["cell"] for r in rows] == ["bits8-none"] * len(rows) and rows
    if rows[0]["status"] == "error":
        assert rows[0]["error"].startswith("bench"), rows[0]["error"]
        assert result.exit_code == 1, result.output
    else:
        assert result.exit_code == 0, result.output
        assert all(isinstance(r, dict) and r["status"] == "ok" for r in strict_json(cache.read_text()))
