"""Training you can watch: ``metrics.csv`` and ``curves.png`` in every run dir, TensorBoard events
while it trains.

The input is a run's per-epoch history (``FitResult.history`` of the loop, or a scheme's
``Run.history``, whose rows carry a ``phase``): ``epoch``, ``loss`` (the objective's total),
``losses`` (each term's mean over the epoch), ``train_accuracy``, ``val_accuracy``, ``lr`` and
``seconds`` (elapsed in the phase). A *segment* is one ``fit``: a new one starts when the phase
changes or its epochs start again (a second QAT stage, a generation). Rows get ``segment`` and
``step`` (the epoch counted over the whole run), which is the x axis of the curves and the step
of the TensorBoard scalars.

matplotlib (``pip install 'edgekd[plot]'``) is optional: without it curves.png is skipped with
one log line. ``--tensorboard`` needs ``pip install 'edgekd[tensorboard]'``.
"""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..core.errors import MissingExtraError
from ..core.fsutil import write_bytes, write_text

Log = Callable[[str], None]
COLUMNS = ("phase", "segment", "epoch", "step", "loss", "train_accuracy", "val_accuracy", "lr", "seconds",
           "epoch_seconds", "best")
PLOT_HINT = "curves.png skipped: matplotlib is not installed (pip install 'edgekd[plot]')"


# --- rows ---------------------------------------------------------------------------------------------------

class Tracker:
    """Numbers history rows as they come: ``segment`` (one per fit) and ``step`` (run-wide epoch)."""

    def __init__(self, default_phase: str = "train"):
        self.default_phase = default_phase
        self.segment, self.step, self.last = 0, 0, None
        self.started = False  # whether the last row began a segment

    def add(self, row: dict) -> dict:
        phase = str(row.get("phase") or self.default_phase)
        epoch = int(row.get("epoch") or 0)
        new = self.last is None or phase != self.last[0] or epoch <= self.last[1]
        previous = 0.0 if new else self.last[2]
        self.segment += 1 if new else 0
        self.step += 1
        seconds = float(row.get("seconds") or 0.0)
        self.last, self.started = (phase, epoch, seconds), new
        return dict(row, phase=phase, segment=self.segment, step=self.step, epoch_seconds=seconds - previous)


def epoch_rows(history: Iterable[dict], default_phase: str = "train") -> list[dict]:
    """The history with ``phase``, ``segment``, ``step`` and ``epoch_seconds`` on every row."""
    tracker = Tracker(default_phase)
    return [tracker.add(r) for r in history]


def term_names(rows: Sequence[dict]) -> list[str]:
    """Every loss term in the rows, in order of first appearance."""
    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r.get("losses") or {}))
    return list(names)


def metrics_csv(rows: Sequence[dict]) -> str:
    """One line per epoch and phase: COLUMNS, with ``loss.<term>`` columns after ``loss``."""
    terms = term_names(rows)
    header = list(COLUMNS[:5]) + [f"loss.{t}" for t in terms] + list(COLUMNS[5:])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        cells = {**{k: r.get(k) for k in COLUMNS}, **{f"loss.{t}": (r.get("losses") or {}).get(t) for t in terms}}
        cells["best"] = 1 if r.get("best") else 0
        writer.writerow(["" if cells[k] is None else _cell(cells[k]) for k in header])
    return out.getvalue()


def _cell(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


# --- the picture --------------------------------------------------------------------------------------------

def plot_available() -> bool:
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        return False


def _segments(rows: Sequence[dict]) -> list[list[dict]]:
    out: list[list[dict]] = []
    for r in rows:
        if not out or out[-1][0]["segment"] != r["segment"]:
            out.append([])
        out[-1].append(r)
    return out


def _series(ax, segments, key, label, style) -> None:
    """One line per segment (not joined across a phase boundary), labelled once."""
    for i, seg in enumerate(segments):
        points = [(r["step"], _value(r, key)) for r in seg]
        points = [p for p in points if p[1] is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label if i == 0 else None,
                    marker="o", markersize=3, **style)


def _value(row: dict, key: str):
    if key.startswith("loss."):
        return (row.get("losses") or {}).get(key[5:])
    return row.get(key)


def _boundaries(axes, segments) -> None:
    """A dotted line before each segment but the first, and each segment's name above the plot."""
    names = [s[0]["phase"] for s in segments]
    for i, seg in enumerate(segments):
        label = seg[0]["phase"] + (f" {names[:i + 1].count(seg[0]['phase'])}" if names.count(seg[0]["phase"]) > 1
                                   else "")
        for ax in axes:
            if i:
                ax.axvline(seg[0]["step"] - 0.5, color="0.5", linestyle=":", linewidth=1)
            ax.text((seg[0]["step"] + seg[-1]["step"]) / 2, 1.01, label, transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8, color="0.3")


def render_png(rows: Sequence[dict], title: str | None = None) -> bytes:
    """Loss (total and per term) and accuracy (train, val) per epoch, phase boundaries marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    segments = _segments(rows)
    _series(loss_ax, segments, "loss", "loss (total)", {"color": "black"})
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    for i, term in enumerate(term_names(rows)):
        _series(loss_ax, segments, f"loss.{term}", term, {"color": colors[i % len(colors)], "linestyle": "--"})
    _series(acc_ax, segments, "train_accuracy", "train", {"color": "tab:blue"})
    _series(acc_ax, segments, "val_accuracy", "val", {"color": "tab:orange"})
    best = [r for r in rows if r.get("best")]
    acc_ax.scatter([r["step"] for r in best], [r["val_accuracy"] for r in best], marker="*", s=70, color="tab:red",
                   zorder=3, label="best val (kept)")
    _boundaries((loss_ax, acc_ax), segments)
    for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch (whole run)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_curves(run_dir: Path, history: Iterable[dict], log: Log, default_phase: str = "train",
                 title: str | None = None) -> list[Path]:
    """``metrics.csv`` and, with matplotlib, ``curves.png`` into ``run_dir``; the files written."""
    rows = epoch_rows(history, default_phase)
    if not rows:
        return []
    run_dir = Path(run_dir)
    write_text(run_dir / "metrics.csv", metrics_csv(rows))
    written = [run_dir / "metrics.csv"]
    if plot_available():
        write_bytes(run_dir / "curves.png", render_png(rows, title))
        written.append(run_dir / "curves.png")
    else:
        log(PLOT_HINT)
    return written


# --- TensorBoard, as epochs finish ------------------------------------------------------------------------

def tensorboard_dir(out: Path) -> Path:
    """Where ``--tensorboard`` writes a run's events while it trains: next to the run dir, in
    ``tensorboard/<run name>`` (the run dir itself appears only when the run is done), so that
    ``tensorboard --logdir runs`` shows every run."""
    out = Path(out)
    return out.parent / "tensorboard" / out.name


class TensorBoard:
    """Scalars per epoch: ``loss/total``, ``loss/<term>``, ``accuracy/train``, ``accuracy/val``,
    ``lr``, at the run-wide epoch ``step``; a text entry marks where each phase starts."""

    def __init__(self, logdir: Path, default_phase: str = "train"):
        if not _tensorboard_available():
            raise MissingExtraError("tensorboard", "tensorboard", "--tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.writer = SummaryWriter(log_dir=str(self.logdir))
        self.tracker = Tracker(default_phase)

    def epoch(self, row: dict) -> None:
        r = self.tracker.add(row)
        w, step = self.writer, r["step"]
        if self.tracker.started:
            w.add_text("phase", f"{r['phase']} (segment {r['segment']}) starts at step {step}", step)
        w.add_scalar("loss/total", r["loss"], step)
        for term, value in (r.get("losses") or {}).items():
            w.add_scalar(f"loss/{term}", value, step)
        w.add_scalar("accuracy/train", r["train_accuracy"], step)
        w.add_scalar("accuracy/val", r["val_accuracy"], step)
        w.add_scalar("lr", r["lr"], step)
        w.flush()

    def close(self) -> None:
        self.writer.close()


def _tensorboard_available() -> bool:
    try:
        return importlib.util.find_spec("tensorboard") is not None
    except (ImportError, ValueError):
        return False


class History(list):
    """A run's history list that also hands each new row to ``on_row`` (TensorBoard, as epochs finish)."""

    def __init__(self, on_row: Callable[[dict], None] | None = None):
        super().__init__()
        self.on_row = on_row

    def append(self, row) -> None:
        super().append(row)
        if self.on_row is not None:
            self.on_row(row)
