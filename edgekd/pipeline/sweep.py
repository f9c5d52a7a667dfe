"""Sweep bit widths (and KD methods): distill, export and bench each cell, then pick.

A *cell* is one (bits, method) pair on one dataset, student and target. Its artifacts live under
the sweep root, so that a re-run resumes where the last one stopped:

    ROOT/sweep.json                  the training options; a resume must use the same ones
    ROOT/runs/<cell>/                ``edgekd distill`` run dir   (done when metrics.json exists)
    ROOT/bundles/<cell>/             ``edgekd export`` bundle     (done when manifest.json exists)
    ROOT/bench/<profile>/<cell>.json its bench rows              (written only when no row errored)

A stage that fails turns the cell into one ``error`` row naming the stage; the other cells go on.
``pareto_front`` and ``best_under_budget`` are plain functions over bench rows (dicts).
Functions here return data; they never print or exit (``log`` gets one line at a time).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from ..core.errors import EdgekdError
from ..core.fsutil import RUNS_DIR, SWEEP_FORMAT, check_output, write_json
from .common import Log, dataset_name, quiet, slug

# Options that decide what a cell's training produces: a resumed sweep must not mix them.
RECIPE_KEYS = ("data", "target", "student", "teacher", "epochs", "float_epochs", "teacher_epochs", "seed",
               "data_options")
RUNNABLE = ("ok", "fail")  # bench statuses that carry measurements
STATUSES = ("ok", "fail", "error", "skipped")


@dataclass(frozen=True)
class Cell:
    bits: int
    method: str = "hinton"

    @property
    def name(self) -> str:
        return f"bits{self.bits}-{self.method}"


@dataclass
class SweepOptions:
    bits: tuple[int, ...] = (8, 4, 2)
    methods: tuple[str, ...] = ("hinton",)
    data: str = "digits"
    target: str = "onnxruntime-cpu"
    student: str = "cnn-student"
    teacher: str | None = None
    epochs: int = 8
    float_epochs: int = 8
    teacher_epochs: int = 20
    seed: int = 0
    profile: str | None = None
    root: Path | None = None
    progress: bool = False
    overwrite: bool = False  # the root may replace a folder edgekd did not write (never other runs)
    read: dict = field(default_factory=dict)  # data.DataOptions fields (normalize, image_size, ...) given

    def cells(self) -> list[Cell]:
        return [Cell(b, m) for m in self.methods for b in self.bits]

    def recipe(self) -> dict:
        from ..data.options import DataOptions

        record = DataOptions(**self.read).record()
        return {k: v for k, v in asdict(self).items() if k in RECIPE_KEYS} | {
            "data_options": record if record != DataOptions().record() else None}


@dataclass
class SweepResult:
    root: Path
    rows: list[dict]  # bench rows (one per cell and batch size), with cell, method, pareto, best
    pareto: list[dict]
    best: dict | None
    batch_size: int | None  # the batch size the Pareto set is computed at
    budgets: object | None = None
    reused: dict = field(default_factory=dict)  # cell name -> stages taken from disk


# --- layout and resume ----------------------------------------------------------------------------

def default_root(opts: SweepOptions, target_name: str) -> Path:
    return RUNS_DIR / "sweeps" / slug(dataset_name(opts.data), opts.student, target_name)


def cell_paths(root: Path, cell: Cell, profile: str | None) -> dict[str, Path]:
    return {"run": root / "runs" / cell.name, "bundle": root / "bundles" / cell.name,
            "bench": root / "bench" / (profile or "default") / f"{cell.name}.json"}


def check_recipe(root: Path, recipe: dict) -> None:
    """Record the training options in ROOT/sweep.json, or refuse a resume that changes them."""
    file = root / "sweep.json"
    if file.is_file():
        try:
            old = json.loads(file.read_text(encoding="utf-8")).get("recipe", {})
        except (ValueError, UnicodeDecodeError, AttributeError):
            raise EdgekdError(f"{file} is damaged (not a JSON object with the sweep's options)",
                              "delete it to start the sweep root afresh, or use another --out") from None
        diff = [f"{k} {old.get(k)!r} -> {recipe[k]!r}" for k in RECIPE_KEYS if old.get(k) != recipe[k]]
        if diff:
            raise EdgekdError(f"sweep root {root} was made with other options ({'; '.join(diff)})",
                              "use the same options to resume, or another --out")
        return
    write_json(file, {"format": SWEEP_FORMAT, "recipe": recipe})


# --- one cell ----------------------------------------------------------------------------------------

def _message(e: BaseException) -> str:
    return e.one_line() if isinstance(e, EdgekdError) else f"{type(e).__name__}: {e}"


def _distill(cell: Cell, opts: SweepOptions, run_dir: Path, log: Log) -> dict:
    from ..config.options import DistillOptions
    from .distill import distill

    if (run_dir / "metrics.json").is_file():
        log(f"{cell.name}: reusing run {run_dir}")
        return json.loads((run_dir / "metrics.json").read_text())
    dopts = DistillOptions(data=opts.data, teacher=opts.teacher, student=opts.student, weight_bits=cell.bits,
                               act_bits=cell.bits, target=opts.target, method=cell.method, epochs=opts.epochs,
                               float_epochs=opts.float_epochs, teacher_epochs=opts.teacher_epochs, seed=opts.seed,
                               progress=opts.progress, **opts.read)
    log(f"{cell.name}: distilling into {run_dir}")
    return distill(dopts, out=run_dir, log=lambda s: log(f"{cell.name}: {s}"))


def _export(cell: Cell, opts: SweepOptions, run_dir: Path, bundle: Path, log: Log) -> None:
    from .deploy import export

    if (bundle / "manifest.json").is_file():
        log(f"{cell.name}: reusing bundle {bundle}")
        return
    log(f"{cell.name}: exporting for {opts.target} into {bundle}")
    from ..models import split_weights

    export(run_dir, opts.target, out=bundle, log=lambda s: log(f"{cell.name}: {s}"),
           student=split_weights(opts.student)[0])


def _bench(cell: Cell, bundle: Path, file: Path, settings, budgets, profile: str | None, log: Log) -> list[dict]:
    from .. import bench

    if file.is_file():
        cached = cached_rows(file)
        if cached is not None:
            log(f"{cell.name}: reusing bench rows {file}")
            return cached
        log(f"{cell.name}: {file} does not hold bench rows; benchmarking again")
    log(f"{cell.name}: benchmarking {bundle}")
    rows = [r.to_dict() for r in bench.bench_bundle(bundle, settings, budgets, profile)]
    if not any(r["status"] == "error" for r in rows):
        write_json(file, rows)
    return rows


def _number(v, kinds=(int, float)) -> bool:
    return v is None or (isinstance(v, kinds) and not isinstance(v, bool))


def _valid_row(r) -> bool:
    """A bench row as ``bench.Row.to_dict`` writes it (the fields the sweep reads, with their types)."""
    latency = r.get("latency_ms") if isinstance(r, dict) else None
    return (isinstance(r, dict) and isinstance(r.get("bundle"), str) and r.get("status") in STATUSES
            and all(_number(r.get(k)) for k in ("accuracy", "size_mb", "throughput_ips", "torch_accuracy"))
            and _number(r.get("batch_size"), int)
            and (latency is None or (isinstance(latency, dict) and all(_number(v) for v in latency.values()))))


def cached_rows(file: Path) -> list[dict] | None:
    """The bench rows a sweep kept in ``file``, or None when it holds anything else."""
    try:
        rows = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return rows if isinstance(rows, list) and rows and all(_valid_row(r) for r in rows) else None


def _error_row(cell: Cell, stage: str, e: BaseException, path: Path, metrics: dict | None) -> dict:
    from ..bench import Row

    m = metrics or {}
    row = Row(bundle=cell.name, path=str(path), status="error", error=f"{stage}: {_message(e)}",
              weight_bits=m.get("weight_bits", cell.bits), act_bits=m.get("act_bits", cell.bits),
              torch_accuracy=m.get("student_accuracy"), teacher_accuracy=m.get("teacher_accuracy"),
              student_float_accuracy=m.get("student_float_accuracy"))
    return row.to_dict()


def run_cell(cell: Cell, opts: SweepOptions, root: Path, settings, budgets, profile: str | None = None,
             log: Log = quiet) -> list[dict]:
    """Bench rows of one cell, each stage skipped when its artifact is on disk; a failing stage
    gives one ``error`` row (``error`` = "<stage>: <message>") instead of raising. ``profile`` is
    the resolved profile name (bench rows are kept per profile)."""
    paths = cell_paths(root, cell, profile)
    stage, metrics = "distill", None
    try:
        metrics = _distill(cell, opts, paths["run"], log)
        stage = "export"
        _export(cell, opts, paths["run"], paths["bundle"], log)
        stage = "bench"
        rows = _bench(cell, paths["bundle"], paths["bench"], settings, budgets, profile, log)
    except Exception as e:  # one cell failing must not stop the sweep
        log(f"{cell.name}: {stage} failed: {_message(e)}")
        rows = [_error_row(cell, stage, e, paths["run" if stage == "distill" else "bundle"], metrics)]
    extra = {"cell": cell.name, "method": cell.method, "requested_bits": cell.bits,
             "distill_seconds": (metrics or {}).get("seconds")}
    return [r | extra for r in rows]


# --- choosing ----------------------------------------------------------------------------------------

def _point(row: dict) -> tuple[float, float, float] | None:
    """(accuracy, p50 ms, size MB) of a measured row, or None when one is unknown."""
    acc, size = row.get("accuracy"), row.get("size_mb")
    p50 = (row.get("latency_ms") or {}).get("p50")
    if row.get("status") not in RUNNABLE or None in (acc, size, p50):
        return None
    return acc, p50, size


def dominates(a: tuple, b: tuple) -> bool:
    """a = (accuracy, latency, size) is at least as good as b everywhere and better somewhere."""
    no_worse = a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2]
    return no_worse and a != b


def pareto_front(rows: Sequence[dict], batch_size: int | None = None) -> list[dict]:
    """Measured rows (at ``batch_size`` when given) that no other such row dominates on higher
    accuracy, lower p50 latency and smaller size; in the input order."""
    points = [(r, _point(r)) for r in rows if batch_size is None or r.get("batch_size") == batch_size]
    points = [(r, p) for r, p in points if p is not None]
    return [r for r, p in points if not any(dominates(q, p) for _, q in points)]


def best_under_budget(rows: Sequence[dict]) -> dict | None:
    """The ``ok`` row (every budget of the profile passed) with the highest accuracy; ties go to
    the lower p50 latency, then the smaller model. None when no row meets the budgets."""
    ok = [(r, _point(r)) for r in rows if r.get("status") == "ok"]
    ok = [(r, p) for r, p in ok if p is not None]
    if not ok:
        return None
    return min(ok, key=lambda rp: (-rp[1][0], rp[1][1], rp[1][2]))[0]


# --- the sweep ---------------------------------------------------------------------------------------

def run_sweep(opts: SweepOptions, log: Log = quiet, settings=None) -> SweepResult:
    """Distill, export and bench every cell of ``opts`` under its root; mark the Pareto set and
    the best configuration under the profile's budgets. ``settings`` overrides the profile's
    bench settings (tests use it to time briefly)."""
    from .. import bench, catalog
    from ..kd import LOSSES

    for method in opts.methods:  # a misspelt method is a usage error, not one error row per cell
        LOSSES.get(method)
    target = catalog.load_target(opts.target)
    prof = catalog.load_profile(opts.profile) if opts.profile else None
    budgets = prof.budgets if prof else None
    settings = settings or bench.resolve_settings(prof)
    for bits in opts.bits:
        if not 2 <= bits <= 8:
            log(f"warning: bits {bits} is outside 2..8; that cell will fail")
    root = Path(opts.root) if opts.root else default_root(opts, target.name)
    check_output(root, "sweep", overwrite=opts.overwrite)
    check_recipe(root, opts.recipe() | {"target": target.name})
    rows: list[dict] = []
    for cell in opts.cells():
        rows.extend(run_cell(cell, opts, root, settings, budgets, prof.name if prof else None, log))
    batch = settings.batch_sizes[0] if settings.batch_sizes else None
    front, best = pareto_front(rows, batch), best_under_budget(rows)
    for r in rows:
        r["pareto"] = any(r is f for f in front)
        r["best"] = r is best
    return SweepResult(root=root, rows=rows, pareto=front, best=best, batch_size=batch, budgets=budgets)


def summary(result: SweepResult) -> list[str]:
    """Lines under the sweep table: the Pareto set and the best configuration under budget."""
    from ..bench.report import bits_label

    def describe(r: dict) -> str:
        return (f"{r['cell']} ({bits_label(r)}, batch {r.get('batch_size')}): accuracy {100 * r['accuracy']:.2f}%, "
                f"p50 {r['latency_ms']['p50']:.3g} ms, {r['size_mb']:.3g} MB")

    lines = [f"Pareto set at batch {result.batch_size} (higher accuracy, lower p50 latency, smaller size):"]
    lines += [f"  {describe(r)}" for r in result.pareto] or ["  (no measured cell)"]
    if result.best is not None:
        what = "meets every budget of the profile" if result.budgets is not None else "no profile: best accuracy"
        lines.append(f"best: {describe(result.best)} - {what}")
    else:
        lines.append("best: no configuration meets the profile's budgets" if result.budgets is not None
                     else "best: no measured cell")
    return lines
