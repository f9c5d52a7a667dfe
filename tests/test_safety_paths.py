"""Safety of what edgekd writes (issue #10): output-path rules, special files, `.partial` folders,
staging folders on SIGINT/SIGTERM, the user's umask, the lock on a run being written, and
--resume with a damaged training state.

The output-path rule, for `distill --out`, `train --out`, `export --out`, `sweep --out` and
`bench --json/--csv/--markdown` (the default output paths obey it too): a command writes only a
new path or a path edgekd wrote before (a run, bundle, sweep root or report edgekd recognises as
its own). Anything else is refused with one `error:` line naming the path, exit 2, unless
`--overwrite` is given. Even with `--overwrite` it never replaces a directory that holds other
runs or bundles, the current directory or any of its parents, the input being read, a
non-regular file (device node, FIFO, socket), nor a regular file given as a directory output.
`--out ''` is a usage error. The checks run before any work: the export cases below read a run
whose student.pt is truncated, so a check made after loading it shows up as a checkpoint error.

Error fragments (each line also names the path): see F_* below.

No case of the table may train (training is replaced by a function that fails the test), nor may
it touch /dev (renames, deletions, chmod and temporary files under /dev fail the test before they
happen: these tests run as root on CI machines, where replacing /dev/null would break the host).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import importlib
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from edgekd.config.options import DEFAULT_STUDENT
from tests.test_bad_input import _save_teacher, assert_user_error, run, run_dir
from tests.test_bench import make_bundle

HERE = Path(__file__).resolve().parent

# --- the error fragments this file assumes ------------------------------------------------------------
F_EMPTY = "must not be empty"  # with the option's name: "--out must not be empty"
F_CWD = "is the current directory or one of its parents"
F_INPUT = "is the input being read"
F_SPECIAL = "not a regular file"  # "X is not a regular file or directory" / "X is not a regular file"
F_FILE = "is a file"  # a regular file given where a directory is written
F_CONTAINER = "holds other runs or bundles"
F_FOREIGN = "was not written by edgekd"  # and the line says "--overwrite"
F_LINK = "is a symbolic link"
F_BUSY = "is being written"
RESUME_HINT = "without --resume"

# bench timing reduced to one call: a case that is (wrongly) not refused still ends fast
FAST_BENCH = ["--iterations", "1", "--warmup", "0", "--warmup-time", "0", "--min-time", "0", "--batch-size", "1"]
SWEEP = ["sweep", "--bits", "8", "--methods", "none", "--epochs", "1", "--float-epochs", "0", "--teacher-epochs", "1"]
TINY = {"method": "none", "epochs": 1, "float_epochs": 0, "teacher_epochs": 1, "train_limit": 64, "progress": False}


# --- shared helpers (imported by test_safety_code.py and test_bad_input_more.py) ------------------------

def snapshot(root: Path) -> dict[str, str]:
    """Every path under root (symlinks not followed) with what it is: a content hash for regular files,
    'dir', 'link:TARGET', or the kind of special file (FIFOs are never opened)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = f"special:{stat.S_IFMT(st.st_mode):o}"
    return out


TRAINING_MODULES = ("edgekd.training.loop", "edgekd.training", "edgekd.train")  # after and before the refactor


def patch_training(monkeypatch, replacement) -> None:
    """Replace the training loop (``fit``) wherever it lives."""
    patched = False
    for name in TRAINING_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "fit"):
            monkeypatch.setattr(module, "fit", replacement)
            patched = True
    assert patched, f"no training loop found in {TRAINING_MODULES}"


def forbid_training(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a bad input reached training")

    patch_training(monkeypatch, refuse)


class ReachedTraining(BaseException):
    """Raised by the training loop in tests that only check that a command gets that far."""


def stop_at_training(monkeypatch) -> None:
    def reached(*args, **kwargs):
        raise ReachedTraining()

    patch_training(monkeypatch, reached)


class TouchedDev(BaseException):
    """edgekd tried to rename, delete, chmod or create something under /dev (BaseException: no
    ``except Exception`` in the code under test can swallow it)."""


def _under_dev(p, itself: bool = False) -> bool:
    """Whether ``p`` lies under /dev (or is /dev itself, with ``itself``)."""
    try:
        path = os.path.abspath(os.fsdecode(os.fspath(p)))
    except TypeError:
        return False
    return path.startswith("/dev/") or (itself and path == "/dev")


def guard_dev(monkeypatch) -> None:
    """Fail the test before anything under /dev is renamed, deleted, chmod-ed or created (writing
    into the existing /dev/null is harmless and allowed)."""
    def wrap(module, name, paths_of):
        real = getattr(module, name)

        def guarded(*args, **kwargs):
            if any(paths_of(args, kwargs)):
                raise TouchedDev(f"{module.__name__}.{name}{args!r} {kwargs!r} would change /dev")
            return real(*args, **kwargs)

        for attr in ("avoids_symlink_attacks",):
            if hasattr(real, attr):
                setattr(guarded, attr, getattr(real, attr))
        monkeypatch.setattr(module, name, guarded)

    def first_two(args, kwargs):
        return [_under_dev(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]

    def temp_dir(args, kwargs):  # mkstemp(suffix, prefix, dir): a temporary file in /dev itself is litter
        folder = kwargs.get("dir") or (args[2] if len(args) > 2 else None)
        return [folder is not None and _under_dev(folder, itself=True)]

    def creates(path, creating: bool):
        return [creating and isinstance(path, (str, bytes, os.PathLike)) and _under_dev(path)
                and not os.path.lexists(path)]

    def open_mode(args, kwargs):
        mode = kwargs.get("mode", args[1] if len(args) > 1 else "r")
        return creates(args[0] if args else kwargs.get("file"), isinstance(mode, str) and any(c in mode for c in "wax+"))

    def open_flags(args, kwargs):
        flags = kwargs.get("flags", args[1] if len(args) > 1 else 0)
        return creates(args[0] if args else kwargs.get("path"), bool(flags & os.O_CREAT))

    for name in ("replace", "rename", "unlink", "remove", "rmdir", "chmod", "chown", "link", "symlink", "mkdir",
                 "mkfifo", "mknod"):
        wrap(os, name, first_two)
    wrap(os, "open", open_flags)
    wrap(builtins, "open", open_mode)
    wrap(io, "open", open_mode)
    wrap(shutil, "rmtree", first_two)
    wrap(shutil, "move", first_two)
    for name in ("mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryDirectory"):
        wrap(tempfile, name, temp_dir)


def dev_null_state():
    st = os.stat("/dev/null")
    return stat.S_ISCHR(st.st_mode), st.st_mode, st.st_rdev


class TookTooLong(BaseException):
    pass


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging) when the block runs longer than ``seconds``."""
    def expired(signum, frame):
        raise TookTooLong(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity (not JSON)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@contextlib.contextmanager
def chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def subprocess_env() -> dict:
    return dict(os.environ, PYTHONWARNINGS="ignore")


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-2000:]
    return errors[0]


def modes(root: Path) -> dict[str, int]:
    """Permission bits of root and everything under it."""
    found = {".": stat.S_IMODE(os.lstat(root).st_mode)}
    for p in root.rglob("*"):
        found[str(p.relative_to(root))] = stat.S_IMODE(os.lstat(p).st_mode)
    return found


def assert_umask_modes(root: Path, mask: int) -> None:
    want_dir, want_file = 0o777 & ~mask, 0o666 & ~mask
    got = modes(root)
    wrong = {name: oct(mode) for name, mode in got.items()
             if mode != (want_dir if (root / name).is_dir() else want_file)}
    assert not wrong, f"under umask {mask:03o} folders should be {want_dir:o} and files {want_file:o}: {wrong}"


# --- a tiny real run and bundle, made once for this module under umask 022 ----------------------------



# --- the table of refused output paths --------------------------------------------------------------------

def fake_run(cwd: Path, art) -> None:
    """./run: a run directory whose student.pt is truncated (a late output check would fail on it)."""
    run_dir()(cwd)


def real_runs(cwd: Path, art) -> None:
    for name in ("r1", "r2"):
        shutil.copytree(art.run, cwd / "runs" / name)


def real_bundles(cwd: Path, art) -> None:
    for name in ("b1", "b2"):
        shutil.copytree(art.bundle, cwd / "bundles" / name)


def foreign_dir(name: str):
    def setup(cwd: Path, art) -> None:
        (cwd / name).mkdir(parents=True)
        (cwd / name / "notes.txt").write_text("my notes\n")
    return setup


def regular_file(name: str, content: str = "keep me\n"):
    def setup(cwd: Path, art) -> None:
        (cwd / name).parent.mkdir(parents=True, exist_ok=True)
        (cwd / name).write_text(content)
    return setup


def fifo(name: str = "fifo"):
    def setup(cwd: Path, art) -> None:
        os.mkfifo(cwd / name)
    return setup


def unix_socket(name: str = "sock"):
    def setup(cwd: Path, art) -> None:
        with chdir(cwd), socket.socket(socket.AF_UNIX) as s:  # relative name: socket paths are short
            s.bind(name)
    return setup


def bench_bundle(cwd: Path, art) -> None:
    make_bundle(cwd, "b")


def teacher_dir(cwd: Path, art) -> None:
    _save_teacher(cwd / "tdir" / "model.pt", "cnn-student", 10)
    (cwd / "tdir" / "metrics.json").write_text(json.dumps({"accuracy": 0.5}))


def partial_foreign(cwd: Path, art) -> None:
    (cwd / "results.partial").mkdir()
    (cwd / "results.partial" / "notes.txt").write_text("not a checkpoint\n")
    (cwd / "results.partial" / "data.csv").write_text("a,b\n1,2\n")


def partial_symlink(cwd: Path, art) -> None:
    elsewhere = cwd.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("outside the output folder\n")
    (cwd / "results.partial").symlink_to("../elsewhere", target_is_directory=True)


def all_of(*setups):
    def setup(cwd: Path, art) -> None:
        for s in setups:
            s(cwd, art)
    return setup


E = ["export", "run"]
OW = "--overwrite"
DEFAULT_RUN = f"runs/digits-{DEFAULT_STUDENT}-w7a8-hinton"  # distill's default --out on digits for the cpu target

# (id, setup, argv ({cwd}: the absolute current directory), fragments of the one error line)
PATH_CASES = [
    # --- export --out -----------------------------------------------------------------------------------
    ("export-out-runs", all_of(fake_run, real_runs), [*E, "--out", "runs"], ["runs", F_CONTAINER]),
    ("export-out-runs-overwrite", all_of(fake_run, real_runs), [*E, "--out", "runs", OW], ["runs", F_CONTAINER]),
    ("export-out-bundles", all_of(fake_run, real_bundles), [*E, "--out", "bundles"], ["bundles", F_CONTAINER]),
    ("export-out-bundles-overwrite", all_of(fake_run, real_bundles), [*E, "--out", "bundles", OW],
     ["bundles", F_CONTAINER]),
    ("export-out-dot", fake_run, [*E, "--out", "."], [F_CWD]),
    ("export-out-dot-overwrite", fake_run, [*E, "--out", ".", OW], [F_CWD]),
    ("export-out-dotdot-overwrite", fake_run, [*E, "--out", "..", OW], ["..", F_CWD]),
    ("export-out-pwd", fake_run, [*E, "--out", "{cwd}"], ["{cwd}", F_CWD]),
    ("export-out-pwd-overwrite", fake_run, [*E, "--out", "{cwd}", OW], ["{cwd}", F_CWD]),
    ("export-out-empty", fake_run, [*E, "--out", ""], ["--out", F_EMPTY]),
    ("export-out-input", fake_run, [*E, "--out", "run"], ["run", F_INPUT]),
    ("export-out-input-overwrite", fake_run, [*E, "--out", "run", OW], ["run", F_INPUT]),
    ("export-out-fifo", all_of(fake_run, fifo()), [*E, "--out", "fifo"], ["fifo", F_SPECIAL]),
    ("export-out-fifo-overwrite", all_of(fake_run, fifo()), [*E, "--out", "fifo", OW], ["fifo", F_SPECIAL]),
    ("export-out-socket-overwrite", all_of(fake_run, unix_socket()), [*E, "--out", "sock", OW], ["sock", F_SPECIAL]),
    ("export-out-dev-null", fake_run, [*E, "--out", "/dev/null"], ["/dev/null", F_SPECIAL]),
    ("export-out-dev-null-overwrite", fake_run, [*E, "--out", "/dev/null", OW], ["/dev/null", F_SPECIAL]),
    ("export-out-regular-file", all_of(fake_run, regular_file("notes.txt")), [*E, "--out", "notes.txt"],
     ["notes.txt", F_FILE]),
    ("export-out-regular-file-overwrite", all_of(fake_run, regular_file("notes.txt")),
     [*E, "--out", "notes.txt", OW], ["notes.txt", F_FILE]),
    ("export-out-foreign-dir", all_of(fake_run, foreign_dir("results")), [*E, "--out", "results"],
     ["results", F_FOREIGN, "--overwrite"]),
    ("export-out-foreign-dir-under-bundles", all_of(fake_run, foreign_dir("bundles/old")),
     [*E, "--out", "bundles/old"], ["bundles/old", F_FOREIGN, "--overwrite"]),
    ("export-default-out-foreign", all_of(fake_run, foreign_dir("bundles/run-onnxruntime-cpu")), E,
     ["bundles/run-onnxruntime-cpu", F_FOREIGN, "--overwrite"]),
    # --- distill --out ------------------------------------------------------------------------------------
    ("distill-out-runs", real_runs, ["distill", "--out", "runs"], ["runs", F_CONTAINER]),
    ("distill-out-runs-overwrite", real_runs, ["distill", "--out", "runs", OW], ["runs", F_CONTAINER]),
    ("distill-out-dot", None, ["distill", "--out", "."], [F_CWD]),
    ("distill-out-dotdot-overwrite", None, ["distill", "--out", "..", OW], ["..", F_CWD]),
    ("distill-out-pwd-overwrite", None, ["distill", "--out", "{cwd}", OW], ["{cwd}", F_CWD]),
    ("distill-out-empty", None, ["distill", "--out", ""], ["--out", F_EMPTY]),
    ("distill-out-regular-file", regular_file("notes.txt"), ["distill", "--out", "notes.txt"], ["notes.txt", F_FILE]),
    ("distill-out-regular-file-overwrite", regular_file("notes.txt"), ["distill", "--out", "notes.txt", OW],
     ["notes.txt", F_FILE]),
    ("distill-out-foreign-dir", foreign_dir("results"), ["distill", "--out", "results"],
     ["results", F_FOREIGN, "--overwrite"]),
    ("distill-default-out-foreign", foreign_dir(DEFAULT_RUN), ["distill"], [DEFAULT_RUN, F_FOREIGN, "--overwrite"]),
    ("distill-out-fifo", fifo(), ["distill", "--out", "fifo"], ["fifo", F_SPECIAL]),
    ("distill-out-dev-null-overwrite", None, ["distill", "--out", "/dev/null", OW], ["/dev/null", F_SPECIAL]),
    ("distill-out-teacher-dir", teacher_dir, ["distill", "--teacher", "tdir/model.pt", "--out", "tdir"],
     ["tdir", F_INPUT]),
    ("distill-out-teacher-dir-overwrite", teacher_dir, ["distill", "--teacher", "tdir/model.pt", "--out", "tdir", OW],
     ["tdir", F_INPUT]),
    ("distill-partial-not-checkpoints", partial_foreign, ["distill", "--out", "results"],
     ["results.partial", F_FOREIGN]),
    ("distill-partial-symlink", partial_symlink, ["distill", "--out", "results"], ["results.partial", F_LINK]),
    # --- train --out --------------------------------------------------------------------------------------
    ("train-out-runs", real_runs, ["train", "--out", "runs"], ["runs", F_CONTAINER]),
    ("train-out-dot-overwrite", None, ["train", "--out", ".", OW], [F_CWD]),
    ("train-out-empty", None, ["train", "--out", ""], ["--out", F_EMPTY]),
    ("train-out-regular-file", regular_file("notes.txt"), ["train", "--out", "notes.txt"], ["notes.txt", F_FILE]),
    ("train-out-foreign-dir", foreign_dir("results"), ["train", "--out", "results"],
     ["results", F_FOREIGN, "--overwrite"]),
    ("train-out-fifo", fifo(), ["train", "--out", "fifo"], ["fifo", F_SPECIAL]),
    # --- sweep --out --------------------------------------------------------------------------------------
    ("sweep-out-runs", real_runs, [*SWEEP, "--out", "runs"], ["runs", F_CONTAINER]),
    ("sweep-out-runs-overwrite", real_runs, [*SWEEP, "--out", "runs", OW], ["runs", F_CONTAINER]),
    ("sweep-out-dot", None, [*SWEEP, "--out", "."], [F_CWD]),
    ("sweep-out-empty", None, [*SWEEP, "--out", ""], ["--out", F_EMPTY]),
    ("sweep-out-regular-file", regular_file("notes.txt"), [*SWEEP, "--out", "notes.txt"], ["notes.txt", F_FILE]),
    ("sweep-out-foreign-dir", foreign_dir("results"), [*SWEEP, "--out", "results"],
     ["results", F_FOREIGN, "--overwrite"]),
    ("sweep-out-fifo", fifo(), [*SWEEP, "--out", "fifo"], ["fifo", F_SPECIAL]),
    # --- bench reports ------------------------------------------------------------------------------------
    ("bench-json-foreign-file", all_of(bench_bundle, regular_file("notes.json", '{"mine": true}\n')),
     ["bench", "b", "--json", "notes.json", *FAST_BENCH], ["notes.json", F_FOREIGN, "--overwrite"]),
    ("bench-csv-foreign-file", all_of(bench_bundle, regular_file("notes.csv", "a,b\n1,2\n")),
     ["bench", "b", "--csv", "notes.csv", *FAST_BENCH], ["notes.csv", F_FOREIGN, "--overwrite"]),
    ("bench-markdown-foreign-file", all_of(bench_bundle, regular_file("notes.md", "# my notes\n")),
     ["bench", "b", "--markdown", "notes.md", *FAST_BENCH], ["notes.md", F_FOREIGN, "--overwrite"]),
    ("bench-json-dev-null", bench_bundle, ["bench", "b", "--json", "/dev/null", *FAST_BENCH], ["/dev/null", F_SPECIAL]),
    ("bench-json-dev-null-overwrite", bench_bundle, ["bench", "b", "--json", "/dev/null", OW, *FAST_BENCH],
     ["/dev/null", F_SPECIAL]),
    ("bench-csv-fifo-overwrite", all_of(bench_bundle, fifo()), ["bench", "b", "--csv", "fifo", OW, *FAST_BENCH],
     ["fifo", F_SPECIAL]),
    ("bench-json-empty", bench_bundle, ["bench", "b", "--json", "", *FAST_BENCH], ["--json", F_EMPTY]),
    ("bench-json-onto-the-bundle-overwrite", bench_bundle,
     ["bench", "b", "--json", "b/manifest.json", OW, *FAST_BENCH], ["b/manifest.json", F_INPUT]),
]


@pytest.mark.parametrize("setup, argv, fragments", [pytest.param(*case[1:], id=case[0]) for case in PATH_CASES])
def test_output_path_is_refused(setup, argv, fragments, trained, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    if setup:
        setup(cwd, trained)
    forbid_training(monkeypatch)
    guard_dev(monkeypatch)
    readers = [os.open(p, os.O_RDONLY | os.O_NONBLOCK) for p in cwd.rglob("*") if p.is_fifo()]  # writers never block
    argv = [a.replace("{cwd}", str(cwd)) for a in argv]
    fragments = [f.replace("{cwd}", str(cwd)) for f in fragments]
    before, dev_null = snapshot(tmp_path), dev_null_state()
    try:
        with deadline(120):
            result = run(*argv)
    finally:
        for fd in readers:
            os.close(fd)
    assert_user_error(result, *fragments)
    assert dev_null_state() == dev_null and dev_null[0], "/dev/null is no longer the character device it was"
    assert snapshot(tmp_path) == before, "a refused command wrote, moved or deleted files"


def test_the_dev_guard_stops_changes_under_dev(tmp_path, monkeypatch):
    guard_dev(monkeypatch)
    with pytest.raises(TouchedDev):
        tempfile.mkstemp(prefix=".null.", suffix=".tmp", dir="/dev")
    with pytest.raises(TouchedDev):
        tempfile.mkdtemp(dir=Path("/dev"))
    with pytest.raises(TouchedDev):
        os.replace(tmp_path / "nothing", "/dev/null")
    with pytest.raises(TouchedDev):
        Path("/dev/.edgekd-guard-test").write_text("x")
    with open("/dev/null", "w") as f:  # writing into it is fine
        f.write("x")
    assert not os.path.lexists("/dev/.edgekd-guard-test")


def test_the_path_table_is_large_and_names_are_unique():
    assert len(PATH_CASES) >= 50
    assert len({case[0] for case in PATH_CASES}) == len(PATH_CASES)


# --- what is allowed: new paths, paths edgekd wrote, and --overwrite of a foreign one ------------------------

def test_bench_replaces_its_own_reports_and_overwrites_a_foreign_one_when_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_bundle(tmp_path, "b")
    reports = ["--json", "rows.json", "--csv", "rows.csv", "--markdown", "rows.md"]
    for _ in range(2):  # the second run replaces files the first one wrote
        result = run("bench", "b", *reports, *FAST_BENCH)
        assert result.exit_code == 0, result.output
    assert strict_json((tmp_path / "rows.json").read_text())[0]["bundle"] == "b"
    (tmp_path / "notes.json").write_text('{"mine": true}\n')
    result = run("bench", "b", "--json", "notes.json", "--overwrite", *FAST_BENCH)
    assert result.exit_code == 0, result.output
    assert strict_json((tmp_path / "notes.json").read_text())[0]["bundle"] == "b"


def test_export_overwrite_replaces_a_foreign_folder_then_rewrites_its_own(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained.run, tmp_path / "run")
    foreign_dir("results")(tmp_path, trained)
    result = run("export", "run", "--out", "results", "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "results" / "notes.txt").exists()
    strict_json((tmp_path / "results" / "manifest.json").read_text())  # manifests are valid JSON (no NaN)
    result = run("export", "run", "--out", "results", "-q")  # edgekd's own bundle: no --overwrite needed
    assert result.exit_code == 0, result.output
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "staging or set-aside folders left"


# --- hidden staging folders are never "the latest" ---------------------------------------------------------

def test_bench_without_argument_never_picks_a_hidden_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_bundle(tmp_path / "bundles", ".real.k2j4x9.tmp")
    result = run("bench", *FAST_BENCH)
    assert_user_error(result, "no bundle found")
    make_bundle(tmp_path / "bundles", "real")
    newer = time.time() + 60
    for p in (tmp_path / "bundles" / ".real.k2j4x9.tmp").iterdir():
        os.utime(p, (newer, newer))
    result = run("bench", "--json", "rows.json", *FAST_BENCH)
    assert result.exit_code == 0, result.output
    [row] = strict_json((tmp_path / "rows.json").read_text())
    assert Path(row["path"]).name == "real" and row["bundle"] == "real"


def test_export_without_argument_never_picks_a_hidden_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    run_dir()(tmp_path / "runs")
    (tmp_path / "runs" / "run").rename(tmp_path / "runs" / ".run.x81kq0.tmp")
    before = snapshot(tmp_path)
    assert_user_error(run("export"), "no distilled run found")
    assert snapshot(tmp_path) == before


# --- staging folders are removed on SIGTERM as on SIGINT ----------------------------------------------------

SIGNAL_DRIVER = r"""
import os, signal, sys
sig = getattr(signal, sys.argv[1])
import onnx
save = onnx.save_model
class Finalized:
    def __del__(self):  # the interrupt is raised inside a finalizer, where Python prints and drops it
        os.kill(os.getpid(), sig)
        (lambda: None)()  # a Python call: the pending signal's handler runs here
def save_then_signal(model, f, *a, **k):  # the signal arrives while the bundle is being assembled
    out = save(model, f, *a, **k)
    if os.environ.get("IN_FINALIZER"):
        Finalized()
    else:
        os.kill(os.getpid(), sig)
    return out
onnx.save_model = onnx.save = save_then_signal
from edgekd.cli import main
sys.argv = ["edgekd", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize("sig, where", [("SIGINT", ""), ("SIGTERM", ""), ("SIGINT", "finalizer")],
                         ids=["SIGINT", "SIGTERM", "SIGINT-dropped-in-a-finalizer"])
def test_interrupted_export_leaves_no_staging_folder(sig, where, trained, tmp_path):
    """Also when the KeyboardInterrupt is raised inside a __del__ (Python drops it there, and the
    export would otherwise go on to write the bundle): edgekd commits nothing after a signal."""
    shutil.copytree(trained.run, tmp_path / "run")
    env = {**subprocess_env(), **({"IN_FINALIZER": "1"} if where else {})}
    result = subprocess.run([sys.executable, "-c", SIGNAL_DRIVER, sig, "export", "run", "--out", "bundles/b", "-q"],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == {"SIGINT": 130, "SIGTERM": 143}[sig], (result.returncode, result.stderr[-2000:])
    stderr = result.stderr
    if where:  # the interrupt was indeed dropped on its way up (Python's own report of it, then edgekd's line)
        assert "Exception ignored" in stderr and stderr.rstrip().endswith("error: interrupted by SIGINT"), stderr
        stderr = stderr.rstrip().splitlines()[-1]
    assert "interrupted" in one_error_line(stderr)
    left = sorted(p.name for p in (tmp_path / "bundles").iterdir()) if (tmp_path / "bundles").exists() else []
    assert left == [], f"left behind after {sig}: {left}"


# --- the user's umask --------------------------------------------------------------------------------------

def test_run_and_bundle_follow_the_umask(trained):
    assert_umask_modes(trained.run, 0o022)  # made under umask 022: folders 0755, files 0644
    assert_umask_modes(trained.bundle, 0o022)


def test_export_follows_another_umask(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained.run, tmp_path / "run")
    with umask(0o027):
        result = run("export", "run", "--out", "b", "-q")
    assert result.exit_code == 0, result.output
    assert_umask_modes(tmp_path / "b", 0o027)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077], ids=["022", "027", "077"])
def test_bench_reports_follow_the_umask(mask, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_bundle(tmp_path, "b")
    with umask(mask):
        result = run("bench", "b", "--json", "out/r.json", "--csv", "out/r.csv", "--markdown", "out/r.md", *FAST_BENCH)
    assert result.exit_code == 0, result.output
    assert_umask_modes(tmp_path / "out", mask)


# --- a run being written is locked ----------------------------------------------------------------------------

# Runs `edgekd distill` for real and pauses it inside its first optimizer step (so after distill has
# started writing the run) until the file "release" appears; "ready" says it has paused.
PAUSE_DRIVER = r"""
import sys, time
from pathlib import Path
import torch
step = torch.optim.AdamW.step
calls = [0]
def paused_step(self, *a, **k):
    out = step(self, *a, **k)
    calls[0] += 1
    if calls[0] == 1:
        Path("ready").write_text("paused")
        started = time.time()
        while not Path("release").exists() and time.time() - started < 300:
            time.sleep(0.1)
    return out
torch.optim.AdamW.step = paused_step
from edgekd.cli import main
sys.argv = ["edgekd", *sys.argv[1:]]
main()
"""


def test_export_refuses_a_run_being_written(trained, tmp_path, monkeypatch):
    """`distill --out run` onto an existing run (edgekd's own, so allowed) holds the run's lock from
    before training until the new run is in place; `export run` meanwhile fails with one line."""
    shutil.copytree(trained.run, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    cmd = [sys.executable, "-c", PAUSE_DRIVER, "distill", "--method", "none", "--epochs", "1", "--float-epochs", "0",
           "--out", "run", "-q"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env())
    try:
        started = time.time()
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None, f"distill ended before pausing: {proc.communicate()[1][-2000:]}"
            assert time.time() - started < 300, "distill did not reach its first step in 300 s"
            time.sleep(0.2)
        before = snapshot(tmp_path / "run")
        assert_user_error(run("export", "run"), "run", F_BUSY)
        assert snapshot(tmp_path / "run") == before and not (tmp_path / "bundles").exists()
        (tmp_path / "release").write_text("go")
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = run("export", "run", "-q")  # the lock went with the process
    assert result.exit_code == 0, result.output


# --- --resume with a damaged training state: one line, and the state is kept -----------------------------------

RESUME = ["distill", "--method", "none", "--epochs", "1", "--float-epochs", "0", "--out", "run", "-q"]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """run.partial of a distill interrupted by SIGINT after its third step (tests/faults.py)."""
    root = tmp_path_factory.mktemp("interrupted")
    result = subprocess.run([sys.executable, str(HERE / "faults.py"), "sigint", "3", "--", *RESUME], cwd=root,
                            capture_output=True, text=True, env=subprocess_env(), timeout=600, check=False)
    assert result.returncode == 130, result.stderr[-2000:]
    assert sorted(p.name for p in (root / "run.partial").iterdir()) == ["options.json", "phase-01.pt"]
    return root / "run.partial"


def options_list(partial: Path) -> None:
    (partial / "options.json").write_text("[1, 2]\n")


def _edit_phase(partial: Path, edit) -> None:
    path = partial / "phase-01.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def phase_without_optimizer(partial: Path) -> None:
    _edit_phase(partial, lambda s: s.pop("optimizer"))


def phase_wrong_shape(partial: Path) -> None:
    def edit(state):
        key = next(k for k, v in state["model"].items() if v.ndim >= 2)
        state["model"][key] = torch.zeros(*(n + 1 for n in state["model"][key].shape))
    _edit_phase(partial, edit)


RESUME_CASES = [
    ("resume-options-json-is-a-list", options_list, ["options.json", RESUME_HINT]),
    ("resume-phase-without-optimizer", phase_without_optimizer, ["phase-01.pt", RESUME_HINT]),
    ("resume-phase-with-a-wrong-shaped-tensor", phase_wrong_shape, ["phase-01.pt", RESUME_HINT]),
]


@pytest.mark.parametrize("damage, fragments", [pytest.param(*c[1:], id=c[0]) for c in RESUME_CASES])
def test_resume_with_a_damaged_state_is_one_line_and_keeps_it(damage, fragments, interrupted, tmp_path, monkeypatch):
    shutil.copytree(interrupted, tmp_path / "run.partial")
    damage(tmp_path / "run.partial")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    with deadline(300):
        result = run(*RESUME, "--resume")
    assert_user_error(result, *fragments)
    assert snapshot(tmp_path) == before, "a refused --resume changed or discarded the training state"
