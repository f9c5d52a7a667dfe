"""Leftovers of the last review: --layer-bits in ASCII digits and cut error echoes, --list-layers with a
rule that matches nothing, ASCII numbers for --teacher-weight (and check/bench), bounded JSON reads of
sweep cells and checkpoints, comm_device as a table, one staging context manager, and sweep's
--qat-temperature / --qat-lr."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from click.testing import CliRunner

from edgekd.cli import main
from edgekd.config import layerbits
from edgekd.core import staging
from edgekd.core.errors import CheckpointError, ConfigError, DiskFullError, EdgekdError
from tests.test_bad_input import assert_user_error


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def deep_json(levels: int = 100_000) -> str:
    return "[" * levels + "]" * levels


# --- 1. --layer-bits: ASCII digits only; long patterns cut in errors -----------------------------------

@pytest.mark.parametrize("text", ["depthwise=W\u0668A8", "depthwise=\uff37\uff18", "depthwise=W\uff18",
                                  "last=A\U0001d7d6", "3.*=W4A\u0664", "first=W8\u00a0A8"])
def test_layer_bits_in_other_scripts_digits_are_refused(text):
    with pytest.raises(ConfigError) as e:
        layerbits.parse_text(text)
    line = e.value.one_line()
    assert "bits must be written with ASCII letters and digits (W, A, 0-9)" in line and "e.g. depthwise=W8A8" in line
    assert "\n" not in line


def test_layer_bits_in_other_scripts_digits_on_the_command_line_is_one_line():
    assert_user_error(run("check", "--target", "rpi", "--layer-bits", "depthwise=W\u0668A8"),
                      "--layer-bits 'depthwise=W\u0668A8': bits must be written with ASCII letters and digits")


@pytest.mark.parametrize("call", [
    lambda long: layerbits.parse_text(long + "=W9"),
    lambda long: layerbits.parse_text(long + "=Q8"),
    lambda long: layerbits.parse_text(long + "=W\u0668"),
    lambda long: layerbits.parse_text(long),
    lambda long: layerbits.parse_text(long + ",,x=W8"),
    lambda long: layerbits.parse_table({"type": long, "weight": 8}),
    lambda long: layerbits.parse_table({long: 1, "type": "last", "weight": 8}),
    lambda long: layerbits.parse_table({"layers": [long, 3], "weight": 8}),
    lambda long: layerbits.parse_table([long]),
    lambda long: layerbits.rules_from(["last=W8", long + "=W9"], "r.toml: layer_bits"),
    lambda long: layerbits.rules_from(long.encode()),
], ids=["bits-range", "bits-form", "bits-ascii", "no-bits", "commas", "type", "key", "layers", "table", "list", "bytes"])
def test_layer_bits_errors_cut_a_long_pattern(call):
    with pytest.raises(ConfigError) as e:
        call("x" * 5000)
    line = e.value.one_line()
    assert len(line) < 400 and "x" * 20 in line and "x" * 120 not in line


def test_layer_bits_long_pattern_on_the_command_line_is_cut():
    result = run("check", "--target", "rpi", "--layer-bits", "y" * 5000 + "=W9")
    assert_user_error(result, "weight bits must be between 2 and 8, got 9")
    assert len(result.output) < 600


def test_list_layers_lists_the_layers_and_names_the_rules_that_match_none():
    result = run("distill", "--list-layers", "--bits", 4, "--target", "rpi", "--layer-bits", "nosuch*=W8",
                 "--layer-bits", "last=W8", "--layer-bits", "z" * 3000 + "=A8")
    assert result.exit_code == 0, result.output
    assert "student layers:" in result.output and "teacher layers:" in result.output
    assert "note: --layer-bits pattern 'nosuch*' matches no Conv or Linear layer of the student" in result.stdout
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 2 and "last" not in " ".join(notes) and len(notes[1]) < 200


def test_list_layers_api_returns_the_unmatched_rules():
    from edgekd import api

    out = api.list_layers(api.DistillOptions(weight_bits=4, act_bits=4, target="rpi",
                                             layer_bits=["nosuch*=W8", "first,last=W8"]))
    assert out["unmatched_rules"] == ["nosuch*"] and out["student"] and out["teacher"]


@pytest.mark.parametrize("args, fragment", [
    (("distill", "--teacher", "a", "--teacher", "b", "--teacher-weight", "\u0660.\u0665", "--teacher-weight", "1"),
     "Invalid value for '--teacher-weight': '\u0660.\u0665' is not a valid float (ASCII digits only)"),
    (("distill", "--teacher-weight", "1_0"), "'1_0' is not a valid float (ASCII digits only)"),
    (("check", "--target", "rpi", "--bits", "\u0668"), "Invalid value for '--bits': '\u0668' is not a valid integer"),
    (("check", "--target", "rpi", "--weight-bits", "\uff18"), "'\uff18' is not a valid integer (ASCII digits only)"),
    (("bench", "--host", "h", "--connect-timeout", "\u0663"),
     "Invalid value for '--connect-timeout': '\u0663' is not a valid integer (ASCII digits only)"),
])
def test_numbers_in_other_scripts_digits_are_refused(args, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(run(*args), fragment)
    assert list(tmp_path.iterdir()) == []


def test_connect_timeout_keeps_its_range():
    assert_user_error(run("bench", "--host", "h", "--connect-timeout", "0"), "0 is not in the range 1<=x<=3600")


# --- 2. JSON edgekd reads back: bounded ----------------------------------------------------------------

def test_sweep_cached_rows_of_a_deeply_nested_file_are_none(tmp_path):
    from edgekd.pipeline import cells

    (tmp_path / "rows.json").write_text(deep_json())
    assert cells.cached_rows(tmp_path / "rows.json") is None


def test_a_reused_cell_with_deeply_nested_metrics_is_a_value_error(tmp_path):
    from edgekd.pipeline import cells

    (tmp_path / "metrics.json").write_text(deep_json())
    with pytest.raises(ValueError, match="nested more than 64 levels"):
        cells._reused(cells.Cell(8), tmp_path, lambda s: None)


def test_a_deeply_nested_sweep_json_is_damaged(tmp_path):
    from edgekd.pipeline import sweep

    (tmp_path / "sweep.json").write_text(deep_json())
    with pytest.raises(EdgekdError, match="sweep.json is damaged"):
        sweep.check_recipe(tmp_path, {"seed": 0})


def test_a_deeply_nested_options_json_is_unreadable_not_a_crash(tmp_path):
    from edgekd.training.checkpoint import RunCheckpoints

    (tmp_path / "options.json").write_text(deep_json())
    assert RunCheckpoints.resumable(tmp_path, {"seed": 0}, "auto") is False
    with pytest.raises(CheckpointError, match="options.json is unreadable"):
        RunCheckpoints.resumable(tmp_path, {"seed": 0}, True)


# --- 3. comm_device: a table of backends ------------------------------------------------------------------

def test_comm_device_is_a_table_of_backends(monkeypatch):
    from edgekd.training import distributed as dd

    assert dd.COMM_DEVICES == {"nccl": "cuda"} and dd.COMM_DEFAULT == "cpu"
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setitem(dd.COMM_DEVICES, "other-gpu-backend", "cuda")
    assert dd.comm_device("other-gpu-backend") == torch.device("cuda", 1)
    assert dd.comm_device("nccl") == torch.device("cuda", 1)
    assert dd.comm_device("gloo") == dd.comm_device("mpi") == torch.device("cpu")


# --- 4. one staging context manager for files and folders -------------------------------------------------

def _enospc(*_):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_staged_turns_disk_full_into_one_error_and_removes_the_staging(folder, tmp_path):
    target = tmp_path / "out"
    with pytest.raises(DiskFullError) as e:
        with staging.staged(target, folder, os.replace) as tmp:
            (tmp / "a" if folder else tmp).write_bytes(b"x")
            _enospc()
    assert e.value.one_line().startswith(f"disk full: no space left on device while writing {target}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_staged_commit_failure_is_one_error_and_the_block_passes_other_errors(folder, tmp_path):
    with pytest.raises(DiskFullError, match="disk full"):
        with staging.staged(tmp_path / "out", folder, _enospc):
            pass
    with pytest.raises(KeyError):
        with staging.staged(tmp_path / "out", folder, os.replace):
            raise KeyError("x")
    assert list(tmp_path.iterdir()) == []
    with staging.staged(tmp_path / "out", folder, os.replace) as tmp:
        (tmp / "a" if folder else tmp).write_bytes(b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_path_and_atomic_dir_share_it(tmp_path):
    from edgekd.core.fsutil import atomic_dir, atomic_path

    for atomic, name in ((atomic_path, "f"), (atomic_dir, "d")):
        with pytest.raises(DiskFullError, match=f"while writing {tmp_path / name}; nothing of it was kept"):
            with atomic(tmp_path / name):
                _enospc()
        assert type(atomic(tmp_path / name)).__name__ == "_GeneratorContextManager"
        assert atomic(tmp_path / name).gen.__name__ == "staged"
    assert list(tmp_path.iterdir()) == []


# --- 5. sweep --qat-temperature / --qat-lr ----------------------------------------------------------------

def test_sweep_flags_reach_the_sweep_options(monkeypatch, tmp_path):
    from edgekd.pipeline import sweep

    seen = {}

    def fake_run(opts, log=None, settings=None):
        seen["opts"] = opts
        raise EdgekdError("stopped here")

    monkeypatch.setattr(sweep, "run_sweep", fake_run)
    assert_user_error(run("sweep", "--bits", 4, "--qat-temperature", 2.5, "--qat-lr", "1e-3", "--out", tmp_path / "s"),
                      "stopped here")
    assert (seen["opts"].qat_temp, seen["opts"].qat_lr) == (2.5, 1e-3)


@pytest.mark.parametrize("args, fragment", [
    (("--qat-lr", 0), "--qat-lr must be > 0, got 0.0"),
    (("--qat-temperature", -1), "--qat-temperature must be"),
    (("--qat-temperature", "\u0662"), "'\u0662' is not a valid float (ASCII digits only)"),
    (("--methods", "dkd,none", "--qat-temperature", 2),
     "--qat-temperature sets the QAT-phase temperature of the hinton or kd cells, and --methods lists neither"),
])
def test_sweep_qat_flags_are_checked_before_any_work(args, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(run("sweep", "--bits", 4, *args), fragment)
    assert list(tmp_path.iterdir()) == []


def test_the_cells_take_the_qat_options(monkeypatch, tmp_path):
    from edgekd.pipeline import cells, distill, sweep

    got = {}
    monkeypatch.setattr(distill, "distill", lambda opts, out, log: got.setdefault(opts.method, opts) and {})
    opts = sweep.SweepOptions(bits=(4,), methods=("hinton", "dkd"), qat_temp=2.5, qat_lr=1e-3)
    for cell in opts.cells():
        cells._distill(cell, opts, tmp_path / cell.name, None, lambda s: None)
    assert (got["hinton"].qat_temperature, got["hinton"].qat_lr) == (2.5, 1e-3)
    assert (got["dkd"].qat_temperature, got["dkd"].qat_lr) == (None, 1e-3)  # dkd has no QAT-phase T
    recipe = opts.recipe()
    assert recipe["qat_temperature"] == 2.5 and recipe["qat_lr"] == 1e-3


def test_a_resume_with_another_qat_lr_is_refused(tmp_path):
    from edgekd.pipeline import sweep

    sweep.check_recipe(tmp_path, sweep.SweepOptions(bits=(4,), qat_lr=1e-3).recipe())
    with pytest.raises(EdgekdError, match="qat_lr 0.001 -> None"):
        sweep.check_recipe(tmp_path, sweep.SweepOptions(bits=(4,)).recipe())
    sweep.check_recipe(tmp_path, sweep.SweepOptions(bits=(4,), qat_lr=1e-3).recipe())


def test_distill_with_a_long_pattern_that_matches_nothing_cuts_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["distill", "--bits", "4", "--layer-bits", "x" * 5000 + "*=W8", "--epochs", "1",
                                       "--float-epochs", "0", "-q"])
    assert result.exit_code == 2 and "matches no Conv or Linear layer" in result.output
    assert len(result.output) < 1500 and "Traceback" not in result.output and not (tmp_path / "runs").exists()
