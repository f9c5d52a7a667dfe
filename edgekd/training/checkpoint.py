"""Training checkpoints: resume a run where it stopped, and stop cleanly on SIGINT/SIGTERM.

A run's training state lives next to its run directory, in ``runs/NAME.partial/``:
``options.json`` (the options that define the run) and one file per training phase, in the order
the scheme runs them (``phase-01.pt`` the float KD phase, ``phase-02.pt`` the QAT phase, more for
born-again generations, assistants and progressive stages). A phase file holds everything the
loop needs to continue bit for bit: model (quantizer scales included), peers, the objective's
learned adapters, optimizer, scheduler, the data-order generator and the RNGs (torch's CPU and
CUDA ones, Python's, NumPy's: ``rng_state``), the epoch and step, the epoch's sample order, the
running sums, the best state so far and the history. It is
written at the end of every epoch, when a phase finishes (``done``), and on SIGINT/SIGTERM
(mid-epoch), always to a temporary file renamed into place, and loads with
``torch.load(weights_only=True)``: tensors and plain containers only.

``--resume`` replays the phases: a finished phase is restored from its file without training, the
interrupted one continues from its step, later ones run as usual. The final result equals an
uninterrupted run's with the same seed (tests/test_resilience.py). The directory is removed when
the run directory has been written.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import distributed as dd
from ..core import interrupts, jsonfile
from ..core.errors import CheckpointError, ConfigError, EdgekdError, MissingFileError
from ..core.fsutil import atomic_path, remove, write_json

FORMAT = "edgekd-train-state-2"  # 2: the objective as a module (its state_dict), not a list of tensors


class Interrupted(EdgekdError):
    """Training stopped by SIGINT/SIGTERM after its state was saved."""

    exit_code = 130


def partial_dir(out: Path) -> Path:
    """Where the training state of the run written to ``out`` lives until it finishes."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _plain(obj):
    """JSON's view of an options dict (tuples become lists), so saved and current compare equal."""
    return json.loads(json.dumps(obj, default=str))


@dataclass
class PhaseCheckpoint:
    path: Path
    label: str

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - corrupt, truncated, or carrying a pickle payload
            raise CheckpointError(f"cannot load training checkpoint {self.path}: {type(e).__name__}",
                                  "run without --resume to start over") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f"{self.path} is not an edgekd training checkpoint",
                                  "run without --resume to start over")
        if state.get("label") != self.label:
            raise CheckpointError(f"{self.path} holds phase '{state.get('label')}', expected '{self.label}'",
                                  "run without --resume to start over")
        return state

    @contextmanager
    def restoring(self):
        """Within the block, a saved state that does not fit the phase (a missing entry, a tensor of
        another shape) is one CheckpointError naming the file, not a traceback."""
        try:
            yield
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as e:
            what = f"no {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:240]
            raise CheckpointError(f"cannot resume from {self.path}: the saved state does not fit this phase ({what})",
                                  "run without --resume to start over") from None

    def save(self, state: dict) -> None:
        """Rank 0 writes (temporary file, then rename); every rank waits until it has."""
        if dd.is_main():
            with atomic_path(self.path) as tmp:
                torch.save({"format": FORMAT, "label": self.label, **state}, tmp)
        dd.barrier()


def _cuda() -> bool:
    """Whether there are CUDA RNGs to save and restore."""
    return torch.cuda.is_available()


def rng_state(gen: torch.Generator) -> dict:
    """Every random state training draws from: the phase's data-order generator, torch's CPU RNG, the
    CUDA RNG of every device (when CUDA is available; under torchrun also each rank's own GPU's, as
    rank 0 alone writes), Python's and NumPy's global RNGs. Tensors and plain values only."""
    import random

    import numpy as np

    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "gen": gen.get_state(),
             "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if _cuda():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
        if dd.world() > 1:
            own = torch.cuda.get_rng_state(torch.cuda.current_device())
            state["cuda_ranks"] = list(dd.gather_rows(own.unsqueeze(0), dd.world()))
    return state


def restore_rng(state: dict, gen: torch.Generator) -> None:
    """Put back what ``rng_state`` saved (a checkpoint without an entry leaves that RNG as it is; CUDA
    states are restored for the devices this machine has)."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    gen.set_state(state["gen"])
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if "numpy" in state:
        npy = state["numpy"]
        np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["cached"]))
    if "cuda" in state and _cuda():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
        ranks = state.get("cuda_ranks")
        if ranks is not None and dd.world() > 1 and len(ranks) == dd.world():
            torch.cuda.set_rng_state(ranks[dd.rank()], torch.cuda.current_device())


class RunCheckpoints:
    """The phase checkpoints of one run (see the module docstring)."""

    def __init__(self, root: Path, options: dict, resume: bool | str, log: Callable[[str], None] = lambda s: None):
        """``resume``: True continues the run saved under ``root`` (its options must match), "auto"
        does so when they match and starts over otherwise, False starts over."""
        self.root, self.count, self.options = Path(root), 0, _plain(options)
        saved_path = self.root / "options.json"
        if self.resumable(self.root, self.options, resume):
            done = sorted(p.name for p in self.root.glob("phase-*.pt"))
            log(f"resuming from {self.root} ({len(done)} phase checkpoint{'s' * (len(done) != 1)})")
            return
        if self.root.exists():
            log(f"discarding the checkpoints of an earlier unfinished run in {self.root} (--resume continues one)")
        dd.barrier()
        if dd.is_main():
            remove(self.root)
            write_json(saved_path, self.options)
        dd.barrier()

    @staticmethod
    def resumable(root: Path, options: dict, resume: bool | str) -> bool:
        """Whether the run under ``root`` will be continued, without writing anything. With
        ``resume`` True, a missing run or different options raise (name the problem and the fix)."""
        saved_path, options = Path(root) / "options.json", _plain(options)
        if resume == "auto":
            try:
                return jsonfile.read(saved_path) == options
            except (OSError, ValueError):
                return False
        if not resume:
            return False
        if not saved_path.is_file():
            raise MissingFileError(f"nothing to resume: {root} holds no interrupted run",
                                   "run without --resume to start, or give the --out of the interrupted run")
        try:
            saved = jsonfile.read(saved_path)
        except (OSError, ValueError):
            raise CheckpointError(f"{saved_path} is unreadable", "run without --resume to start over") from None
        if not isinstance(saved, dict):
            raise CheckpointError(f"{saved_path} is damaged: not a JSON object of options",
                                  "run without --resume to start over")
        diff = [k for k in sorted(set(saved) | set(options)) if saved.get(k) != options.get(k)]
        if diff:
            shown = ", ".join(f"{k} (was {saved.get(k)!r}, now {options.get(k)!r})" for k in diff[:3])
            raise ConfigError(f"--resume with options that differ from the interrupted run's: {shown}",
                              "resume with the same options, or run without --resume to start over")
        return True

    def phase(self, label: str) -> PhaseCheckpoint:
        self.count += 1
        return PhaseCheckpoint(self.root / f"phase-{self.count:02d}.pt", label)

    def finish(self) -> None:
        """The run directory is written: the training state is no longer needed."""
        dd.barrier()
        if dd.is_main():
            shutil.rmtree(self.root, ignore_errors=True)


class StopSignals:
    """Within the block (main thread only, and when ``active``), SIGINT and SIGTERM set ``received``
    instead of killing the process, so the loop can finish its step and save; a second signal of
    the same kind while the first is being handled is ignored. Inactive, signals keep their
    handlers and ``received`` stays None."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, active: bool = True) -> None:
        self.active = active
        self.received: str | None = None
        self._old: dict = {}

    def _handler(self, signum, _frame) -> None:
        self.received = self.received or signal.Signals(signum).name
        interrupts.note(signal.Signals(signum).name)  # the command's exit status: 128 + the signal's number

    def __enter__(self) -> "StopSignals":
        if self.active and threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
