"""Safety round 2 (issue #21): what edgekd deletes when it replaces an output, the staging a killed
writer leaves, a full disk, exit codes of signals, and the cache folder variable.

- A run, trained model or bundle is replaced only when everything in it is edgekd's: a run or
  bundle put inside it, a user's file, are never deleted (refused with one line naming them);
  nothing is written inside such a folder; a fixed-name sibling (``.NAME.old``) is never touched.
- Staging names carry their writer (``.NAME.edgekd-HOST-PID-START-xxxxxxxx.tmp``): a later write
  into the same folder removes those of a dead writer, and nothing else.
- A full disk is one line saying so (exit 2), nothing half-written is left, the old output stays.
- SIGTERM exits 143, SIGINT 130, also when the interrupt surfaced as another exception.
- ``EDGEKD_CACHE_DIR`` that is not a folder is one line naming the variable.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekd.core import fsutil, staging
from edgekd.core.errors import ConfigError, EdgekdError
from tests.test_bad_input import assert_user_error, run
from tests.test_safety_paths import (F_CONTAINER, F_FOREIGN, HERE, forbid_training, guard_dev,
                                     one_error_line, snapshot, subprocess_env)

F_FULL = "disk full"
F_INSIDE = "is inside the edgekd"
F_NOT_OURS = "which edgekd did not write"
TINY_DISTILL = ["distill", "--method", "none", "--epochs", "1", "--float-epochs", "0", "-q"]




def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def dead_owner() -> str:
    """The owner part of a staging name (HOST-PID-START) of a process that has ended."""
    proc = subprocess.Popen(["sleep", "30"])
    start = staging._start_time(proc.pid) or 0
    proc.kill()
    proc.wait()
    return f"{staging._host()}-{proc.pid}-{start}"


def live_owner() -> str:
    return staging._owner()


# --- 1. replacing an output deletes only what edgekd wrote ------------------------------------------------

@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_rewriting_a_run_never_deletes_a_run_put_inside_it(overwrite, trained, tmp_path, monkeypatch):
    shutil.copytree(trained.run, tmp_path / "runs" / "a")
    shutil.copytree(trained.run, tmp_path / "runs" / "a" / "b")  # as `distill --out runs/a/b` used to write
    monkeypatch.chdir(tmp_path)
    forbid_training(monkeypatch)
    before = snapshot(tmp_path)
    result = run(*TINY_DISTILL, "--out", "runs/a", *(["--overwrite"] if overwrite else []))
    assert_user_error(result, "runs/a", F_CONTAINER, "runs/a/b")
    assert snapshot(tmp_path) == before


def test_nothing_is_written_inside_a_run_or_a_bundle(trained, tmp_path, monkeypatch):
    shutil.copytree(trained.run, tmp_path / "runs" / "a")
    shutil.copytree(trained.bundle, tmp_path / "bundles" / "x")
    monkeypatch.chdir(tmp_path)
    forbid_training(monkeypatch)
    before = snapshot(tmp_path)
    assert_user_error(run(*TINY_DISTILL, "--out", "runs/a/b"), "runs/a/b", F_INSIDE, "run")
    assert_user_error(run("export", "runs/a", "--out", "bundles/x/y", "-q"), "bundles/x/y", F_INSIDE, "bundle")
    assert_user_error(run("bench", "bundles/x", "--json", "runs/a/rows.json"), "runs/a/rows.json", F_INSIDE)
    assert snapshot(tmp_path) == before


def test_rewriting_a_bundle_never_deletes_a_bundle_put_inside_it(trained, tmp_path, monkeypatch):
    shutil.copytree(trained.run, tmp_path / "run")
    shutil.copytree(trained.bundle, tmp_path / "b")
    shutil.copytree(trained.bundle, tmp_path / "b" / "inner")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert_user_error(run("export", "run", "--out", "b", "-q"), F_CONTAINER, "b/inner")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("entry", ["notes.txt", ".git", "plots"])
def test_rewriting_an_output_that_holds_a_foreign_entry_is_refused(entry, trained, tmp_path, monkeypatch):
    shutil.copytree(trained.run, tmp_path / "run")
    shutil.copytree(trained.bundle, tmp_path / "b")
    for out in (tmp_path / "run", tmp_path / "b"):
        if "." in entry.strip("."):
            (out / entry).write_text("mine\n")
        else:
            (out / entry).mkdir()
            (out / entry / "keep.txt").write_text("mine\n")
    monkeypatch.chdir(tmp_path)
    forbid_training(monkeypatch)
    before = snapshot(tmp_path)
    assert_user_error(run(*TINY_DISTILL, "--out", "run"), "run", entry, F_NOT_OURS, "--overwrite")
    assert_user_error(run("export", "run", "--out", "b", "-q"), "b", entry, F_NOT_OURS, "another folder")
    assert snapshot(tmp_path) == before


def test_fixed_name_siblings_are_never_touched(trained, tmp_path, monkeypatch):
    """`.b.old` and other look-alikes next to the output are not edgekd's staging: they stay."""
    shutil.copytree(trained.run, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    owners = {"live": live_owner(), "other-host": "abcdef-" + dead_owner().split("-", 1)[1]}
    siblings = [".b.old", ".b.k2j4x9ab.tmp", ".b.old.tmp", *(f".b.edgekd-{o}-abcdefgh.tmp" for o in owners.values())]
    if owners["other-host"].startswith(staging._host()):
        siblings.pop()
    for name in siblings:
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text(name)
    for _ in range(2):  # a new bundle, then edgekd's own replaced
        result = run("export", "run", "--out", "b", "-q")
        assert result.exit_code == 0, result.output
    for name in siblings:
        assert (tmp_path / name / "keep.txt").read_text() == name
    assert hidden(tmp_path) == sorted(siblings), "staging or set-aside folders left"


def test_an_entry_that_appears_while_the_output_is_written_is_kept(trained, tmp_path):
    shutil.copytree(trained.bundle, tmp_path / "b")
    before = snapshot(tmp_path / "b")
    with pytest.raises(EdgekdError) as caught:
        with fsutil.atomic_dir(tmp_path / "b") as tmp:
            (tmp / "manifest.json").write_text("{}")
            (tmp_path / "b" / "late.txt").write_text("written meanwhile\n")
    assert "late.txt" in caught.value.one_line() and F_NOT_OURS in caught.value.one_line()
    assert snapshot(tmp_path / "b") == before | {"late.txt": snapshot(tmp_path / "b")["late.txt"]}
    [kept] = [p for p in tmp_path.iterdir() if p.name.startswith("b.new-")]
    assert kept.name in caught.value.one_line() and (kept / "manifest.json").is_file()
    assert hidden(tmp_path) == []


def test_overwrite_consents_only_to_what_was_there(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "notes.txt").write_text("mine\n")
    fsutil.check_output(tmp_path / "f", "bundle", overwrite=True)
    with pytest.raises(EdgekdError, match="late.txt"):
        with fsutil.atomic_dir(tmp_path / "f") as tmp:
            (tmp / "manifest.json").write_text("{}")
            (tmp_path / "f" / "late.txt").write_text("written after the check\n")
    assert sorted(os.listdir(tmp_path / "f")) == ["late.txt", "notes.txt"]
    fsutil.check_output(tmp_path / "f", "bundle", overwrite=True)  # asked again, with both there: replaced
    with fsutil.atomic_dir(tmp_path / "f") as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert os.listdir(tmp_path / "f") == ["manifest.json"]


def test_overwrite_never_discards_a_foreign_partial_folder(tmp_path, monkeypatch):
    (tmp_path / "results.partial").mkdir()
    (tmp_path / "results.partial" / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "results.partial" / ".phase-01.pt.tmp").write_text("a look-alike of an old staging name\n")
    monkeypatch.chdir(tmp_path)
    forbid_training(monkeypatch)
    for _ in range(2):  # then with only the look-alike of a staging file left
        before = snapshot(tmp_path)
        assert_user_error(run(*TINY_DISTILL, "--out", "results", "--overwrite"), "results.partial", F_FOREIGN)
        assert snapshot(tmp_path) == before
        (tmp_path / "results.partial" / "notes.txt").unlink(missing_ok=True)


# --- 2. stale staging of a killed writer is cleaned up, nothing else --------------------------------------

def test_a_killed_export_leaves_staging_that_the_next_write_removes(trained, tmp_path, monkeypatch):
    shutil.copytree(trained.run, tmp_path / "run")
    result = subprocess.run([sys.executable, str(HERE / "faults.py"), "kill-onnx", "1", "--", "export", "run",
                             "--out", "bundles/b", "-q"], cwd=tmp_path, capture_output=True, text=True,
                            env=subprocess_env(), timeout=600, check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    [left] = hidden(tmp_path / "bundles")
    assert staging.STAGED.fullmatch(left) and (tmp_path / "bundles" / left / "model.onnx").is_file()
    keep = [".b.old", ".b.k2j4x9ab.tmp", f".b.edgekd-{live_owner()}-abcdefgh.tmp", f".c.edgekd-{dead_owner()}.tmp",
            f".notes.edgekd-{dead_owner()}-abcdefgh.txt"]
    for name in keep:
        (tmp_path / "bundles" / name).mkdir()
    monkeypatch.chdir(tmp_path)
    result = run("export", "run", "--out", "bundles/c", "-q")  # another output in the same folder
    assert result.exit_code == 0, result.output
    assert hidden(tmp_path / "bundles") == sorted(keep)
    assert sorted(p.name for p in (tmp_path / "bundles").iterdir() if not p.name.startswith(".")) == ["c"]


def test_a_set_aside_folder_of_a_killed_writer_is_put_back(trained, tmp_path):
    aside = tmp_path / f".b.edgekd-{dead_owner()}-abcdefgh.old"  # killed after setting b aside, before the new b
    shutil.copytree(trained.bundle, aside)
    before = snapshot(aside)
    live = tmp_path / f".c.edgekd-{live_owner()}-abcdefgh.old"
    live.mkdir()
    fsutil.write_text(tmp_path / "other.txt", "a write into the same folder\n")
    assert snapshot(tmp_path / "b") == before and not aside.exists() and live.is_dir()
    shutil.copytree(trained.bundle, aside)  # killed after the new b was in place: the old one goes
    fsutil.write_text(tmp_path / "other.txt", "again\n")
    assert not aside.exists() and snapshot(tmp_path / "b") == before and live.is_dir()


# --- 3. a full disk -------------------------------------------------------------------------------------

def _enospc(*_):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _half_then_full(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    _enospc()


def assert_disk_full(result, *fragments) -> None:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error:")]
    for fragment in (F_FULL, "no space left on device", *fragments):
        assert fragment in line, (fragment, line)
    assert "re-export" not in result.output


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_disk_full_while_the_model_is_saved_is_one_line(existing, trained, tmp_path, monkeypatch):
    import onnx

    shutil.copytree(trained.run, tmp_path / "run")
    if existing:
        shutil.copytree(trained.bundle, tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.setattr(onnx, "save_model", lambda model, f, *a, **k: _half_then_full(f, model.SerializeToString()))
    monkeypatch.setattr(onnx, "save", onnx.save_model)
    assert_disk_full(run("export", "run", "--out", "b", "-q"), "b")
    assert snapshot(tmp_path) == before  # nothing half-written, the old bundle untouched


def test_disk_full_reported_by_a_library_as_its_own_error_is_one_line(trained, tmp_path, monkeypatch):
    """ONNX Runtime saving its optimized model on a full disk says "Protobuf serialization failed"."""
    import onnxruntime

    shutil.copytree(trained.run, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    real_session, real_statvfs = onnxruntime.InferenceSession, os.statvfs
    full = {"on": False}

    def session(path, sess_options=None, *a, **k):
        if sess_options is not None and sess_options.optimized_model_filepath:
            Path(sess_options.optimized_model_filepath).write_bytes(b"\x08" * 100)
            full["on"] = True
            raise RuntimeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Protobuf serialization failed.")
        return real_session(path, sess_options, *a, **k)

    def statvfs(path):
        st = real_statvfs(path)
        if not (full["on"] and str(Path(path).absolute()).startswith(str(tmp_path))):
            return st
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 0, 0, st.f_files, st.f_ffree, st.f_favail,
                                  st.f_flag, st.f_namemax))

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    monkeypatch.setattr(os, "statvfs", statvfs)
    assert_disk_full(run("export", "run", "--out", "b", "-q"), "b")
    assert snapshot(tmp_path) == before


def test_disk_full_while_the_run_is_saved_is_one_line(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    real = torch.save

    def save(obj, f, *a, **k):  # the run's files, not the training checkpoints
        if ".r.edgekd-" not in str(f):
            return real(obj, f, *a, **k)
        Path(f).write_bytes(b"PK" * 64)
        _enospc()

    monkeypatch.setattr(torch, "save", save)
    assert_disk_full(run(*TINY_DISTILL, "--out", "r"), "r")
    assert not (tmp_path / "r").exists() and not [n for n in hidden(tmp_path) if n.startswith(".r.")]


def test_disk_full_while_a_report_is_written_is_one_line(tmp_path, monkeypatch):
    from tests.test_bench import make_bundle
    from tests.test_safety_paths import FAST_BENCH

    monkeypatch.chdir(tmp_path)
    make_bundle(tmp_path, "b")
    before = snapshot(tmp_path)
    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).name == "rows.json":
            _enospc()
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    assert_disk_full(run("bench", "b", "--json", "rows.json", *FAST_BENCH), "rows.json")
    assert snapshot(tmp_path) == before


# --- 4, 5. signals: 128 + the signal's number, whatever exception they became -----------------------------

@pytest.mark.parametrize("sig, code", [("sigint", 130), ("sigterm", 143)])
def test_a_signal_during_training_exits_with_its_number(sig, code, tmp_path):
    result = subprocess.run([sys.executable, str(HERE / "faults.py"), sig, "3", "--", *TINY_DISTILL, "--out", "run"],
                            cwd=tmp_path, capture_output=True, text=True, env=subprocess_env(), timeout=600,
                            check=False)
    assert result.returncode == code, result.stderr[-2000:]
    line = one_error_line(result.stderr)
    assert f"interrupted by {sig.upper()}" in line and "--resume" in line
    assert (tmp_path / "run.partial" / "options.json").is_file() and not (tmp_path / "run").exists()


PROBE = """
import os, signal
os.kill(os.getpid(), signal.{sig})
VALUE = [n for n in range(1000)]  # the handler runs here: its interrupt is raised inside this import
"""


class NoHandler(BaseException):
    """The signal reached the test's own handler: edgekd had none installed."""


@pytest.mark.parametrize("sig, became", [("SIGTERM", "ImportError"), ("SIGTERM", "swallowed"),
                                         ("SIGINT", "RuntimeError")])
def test_a_signal_that_surfaced_as_another_exception_is_still_an_interruption(sig, became, trained, tmp_path,
                                                                               monkeypatch):
    """A library that imports a module while the signal arrives turns the interrupt into its own
    exception (or swallows it): the command still ends as interrupted, one line, 128 + the number."""
    import importlib

    import onnx

    shutil.copytree(trained.run, tmp_path / "run")
    name = f"edgekd_probe_{sig.lower()}_{became.lower()}"
    (tmp_path / f"{name}.py").write_text(PROBE.format(sig=sig))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    save = onnx.save_model

    def save_then_import(model, f, *a, **k):
        out = save(model, f, *a, **k)
        try:
            importlib.import_module(name)
        except BaseException as e:  # noqa: BLE001 - what such a library does
            if became != "swallowed":
                raise {"ImportError": ImportError, "RuntimeError": RuntimeError}[became](f"cannot load {name}") from e
        return out

    monkeypatch.setattr(onnx, "save_model", save_then_import)
    monkeypatch.setattr(onnx, "save", save_then_import)

    def no_handler(signum, frame):
        raise NoHandler()

    old = {s: signal.signal(s, no_handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = run("export", "run", "--out", "bundles/b", "-q")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        sys.modules.pop(name, None)
    assert_user_error(result, f"interrupted by {sig}", code={"SIGINT": 130, "SIGTERM": 143}[sig])
    assert not (tmp_path / "bundles").exists() or not os.listdir(tmp_path / "bundles")


# --- 6. the cache folder variable -------------------------------------------------------------------------

def make_images(root: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / label / f"{i}.png")


@pytest.mark.parametrize("where", ["/dev/null", "afile", "afile/sub"])
def test_a_cache_folder_that_is_not_a_folder_is_one_line(where, tmp_path, monkeypatch):
    make_images(tmp_path / "imgs")
    (tmp_path / "afile").write_text("a file\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGEKD_CACHE_DIR", where)
    guard_dev(monkeypatch)
    before = snapshot(tmp_path)
    result = run("train", "--data", "imagefolder:imgs", "--arch", "mlp-student", "--epochs", "1", "--out", "t",
                 "--image-cache", "on", "-q")
    assert_user_error(result, "EDGEKD_CACHE_DIR", where.split("/sub")[0], "--image-cache off")
    assert snapshot(tmp_path) == before


def test_the_cache_variable_is_named_whichever_chose_the_folder(tmp_path, monkeypatch):
    from edgekd.data import decoded

    (tmp_path / "afile").write_text("a file\n")
    monkeypatch.delenv("EDGEKD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "afile"))
    with pytest.raises(ConfigError, match="XDG_CACHE_HOME"):
        decoded.why_not("on", 10, decoded.cache_dir())
    assert decoded.why_not("off", 10, decoded.cache_dir()) == "--image-cache off"  # off: never looked at
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert decoded.why_not("on", 10, decoded.cache_dir()) is None


def test_a_bad_cache_variable_does_not_matter_with_the_cache_off(tmp_path, monkeypatch):
    make_images(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGEKD_CACHE_DIR", "/dev/null")
    started = time.time()
    result = run("train", "--data", "imagefolder:imgs", "--arch", "mlp-student", "--epochs", "1", "--out", "t",
                 "--image-cache", "off", "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t" / "model.pt").is_file() and time.time() - started < 120
