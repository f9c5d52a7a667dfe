"""Code named in files (issue #10): a model spec naming ``module:callable`` is taken from the command
line or the Python API only. A file (a run's student.pt, a teacher checkpoint, a recipe) that names
one is refused with one line that says to pass the architecture on the command line
(``export RUN --student mypkg.nets:make``, ``distill --teacher ARCH=FILE``, ``--student`` for a
recipe) or to pass ``--trust-code``; the code never runs. Named again on the command line, or with
``--trust-code``, it works. Files may still name built-in and ``torchvision:`` architectures.

The code is ``helpers:build`` from a helpers.py in the current directory (which ``python -m edgekd``
puts on sys.path; in-process tests prepend it): it writes the marker file PWNED into the current
directory, then builds a small MLP. ``tempfile:mkdtemp`` is the other spec: calling it creates a
folder (here in a private temporary directory, which must stay empty).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.test_bad_input import MARKER, _save_teacher, assert_user_error, run
from tests.test_safety_paths import (
    TINY,
    ReachedTraining,
    chdir,
    forbid_training,
    one_error_line,
    snapshot,
    stop_at_training,
    subprocess_env,
)

HELPERS = '''\
"""helpers:build - running it leaves the file PWNED in the current directory."""
from pathlib import Path

from torch import nn


def build(num_classes=10, in_channels=1):
    Path("PWNED").write_text("helpers.build ran")
    return tiny(num_classes, in_channels)


def tiny(num_classes, in_channels):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, 32), nn.ReLU(), nn.Linear(32, num_classes))
'''
CODE = "helpers:build"
# fragments of the refusal line (besides the file's name and the spec in quotes)
COMMAND_LINE, TRUST = "command line", "--trust-code"


def tiny_without_running_build(num_classes: int = 10, in_channels: int = 1):
    """The architecture helpers.build returns, built here without running build (helpers.py is
    loaded under another name, so the module the tests import stays fresh)."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "helpers_copy.py"
        source.write_text(HELPERS)
        spec = importlib.util.spec_from_file_location("helpers_copy", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module.tiny(num_classes, in_channels)


@pytest.fixture(scope="module")
def code_run(tmp_path_factory):
    """A tiny run whose student came from helpers:build, given through the Python API (allowed)."""
    from edgekd import api

    root = tmp_path_factory.mktemp("safety-code")
    (root / "helpers.py").write_text(HELPERS)
    sys.path.insert(0, str(root))
    try:
        with chdir(root):
            api.distill(api.DistillOptions(student=CODE, **TINY), out=root / "run")
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("helpers", None)
    assert (root / MARKER).exists()  # the callable did run, as asked
    return root / "run"


@pytest.fixture
def here(tmp_path, monkeypatch):
    """The current directory holds helpers.py and is on sys.path; a private temporary directory."""
    (tmp_path / "helpers.py").write_text(HELPERS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "helpers", raising=False)
    private = tmp_path / "tmpdir"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    return tmp_path


def copy_run(run: Path, to: Path, arch: str | None = None) -> Path:
    shutil.copytree(run, to)
    if arch is not None:
        ckpt = torch.load(to / "student.pt", weights_only=True)
        ckpt["meta"]["arch"] = arch
        torch.save(ckpt, to / "student.pt")
    return to


def code_teacher(path: Path, arch: str = CODE) -> None:
    """A teacher checkpoint for digits whose metadata names ``arch`` (weights of helpers' MLP)."""
    from edgekd.models import save_checkpoint

    meta = {"arch": arch, "num_classes": 10, "input_shape": [1, 8, 8], "dataset": "digits", "seed": 0,
            "classes": [str(i) for i in range(10)], "normalization": {"mean": [0.0], "std": [1.0]}}
    save_checkpoint(path, tiny_without_running_build().state_dict(), meta)


def test_the_helpers_payload_is_live(here):
    """Named on the command line, helpers:build runs (that is what the refusals below prevent)."""
    result = run("distill", "--student", CODE, "--list-layers")
    assert result.exit_code == 0, result.output
    assert (here / MARKER).exists()


# --- export: student.pt names code ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", [CODE, "tempfile:mkdtemp"])
def test_export_refuses_a_run_whose_checkpoint_names_code(arch, code_run, here):
    copy_run(code_run, here / "run", arch)
    before = snapshot(here)
    assert_user_error(run("export", "run"), "run/student.pt", f"'{arch}'", COMMAND_LINE, "--student", TRUST)
    assert not (here / MARKER).exists(), "the callable named in the checkpoint ran"
    assert snapshot(here) == before  # nothing written, and nothing created in the temporary directory


def test_export_refuses_in_a_real_process_too(code_run, tmp_path):
    """`python -m edgekd` has the current directory on sys.path: the realistic attack."""
    (tmp_path / "helpers.py").write_text(HELPERS)
    copy_run(code_run, tmp_path / "run")
    result = subprocess.run([sys.executable, "-m", "edgekd", "export", "run"], cwd=tmp_path, capture_output=True,
                            text=True, env=subprocess_env(), timeout=600, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    line = one_error_line(result.stderr)
    assert f"'{CODE}'" in line and TRUST in line
    assert not (tmp_path / MARKER).exists()
    assert not (tmp_path / "bundles").exists()


@pytest.mark.parametrize("flags", [["--student", CODE], [TRUST]], ids=["named-again", "trust-code"])
def test_export_runs_the_callable_when_the_user_asks(flags, code_run, here):
    copy_run(code_run, here / "run")
    result = run("export", "run", "--out", "b", "-q", *flags)
    assert result.exit_code == 0, result.output
    assert (here / "b" / "manifest.json").is_file()
    assert (here / MARKER).exists()


# --- distill: teacher checkpoints and recipes name code --------------------------------------------------

def test_distill_refuses_a_teacher_checkpoint_that_names_code(here, monkeypatch):
    code_teacher(here / "t.pt")
    forbid_training(monkeypatch)
    before = snapshot(here)
    assert_user_error(run("distill", "--teacher", "t.pt"), "t.pt", f"'{CODE}'", COMMAND_LINE, "--teacher", TRUST)
    assert not (here / MARKER).exists()
    assert snapshot(here) == before


@pytest.mark.parametrize("flags", [["--teacher", f"{CODE}=t.pt"], ["--teacher", "t.pt", TRUST]],
                         ids=["arch-on-the-command-line", "trust-code"])
def test_distill_builds_the_teacher_when_the_user_asks(flags, here, monkeypatch):
    code_teacher(here / "t.pt")
    stop_at_training(monkeypatch)
    with pytest.raises(ReachedTraining):
        run("distill", *flags, "--force")  # an untrained teacher is near chance: the check would stop it
    assert (here / MARKER).exists()


@pytest.mark.parametrize("key", ["student", "teacher"])
def test_distill_refuses_a_recipe_that_names_code(key, here, monkeypatch):
    (here / "r.toml").write_text(f'method = "hinton"\n{key} = "{CODE}"\n')
    forbid_training(monkeypatch)
    before = snapshot(here)
    assert_user_error(run("distill", "--config", "r.toml"), "r.toml", f"'{CODE}'", COMMAND_LINE, TRUST)
    assert not (here / MARKER).exists()
    assert snapshot(here) == before


@pytest.mark.parametrize("flags", [[TRUST], ["--student", CODE]], ids=["trust-code", "named-on-the-command-line"])
def test_distill_takes_the_recipe_student_when_the_user_asks(flags, here, monkeypatch):
    (here / "r.toml").write_text(f'method = "none"\nstudent = "{CODE}"\n')
    stop_at_training(monkeypatch)
    with pytest.raises(ReachedTraining):
        run("distill", "--config", "r.toml", *flags)
    assert (here / MARKER).exists()


# --- files may still name built-in and torchvision architectures -------------------------------------------

def test_a_recipe_may_name_a_builtin_student(here, monkeypatch):
    (here / "r.toml").write_text('method = "none"\nstudent = "mlp-student"\n')
    stop_at_training(monkeypatch)
    with pytest.raises(ReachedTraining):
        run("distill", "--config", "r.toml")


def test_a_teacher_checkpoint_may_name_a_torchvision_architecture(here, monkeypatch):
    _save_teacher(here / "tv.pt", "torchvision:shufflenet_v2_x0_5", 10)
    stop_at_training(monkeypatch)
    with pytest.raises(ReachedTraining):
        run("distill", "--teacher", "tv.pt", "--force")  # untrained: near chance
    assert not (here / MARKER).exists()

