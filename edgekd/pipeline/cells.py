"""One cell of a sweep: (bits, method, seed) -> a run dir, a bundle, bench rows, each stage skipped
when its artifact is on disk, a failing stage turned into one ``error`` row.

Methods: a KD method or ``none`` (QAT alone) distill a student; ``ptq`` quantizes, after training,
the float student of the sweep's first trained method at the same seed; ``fp32`` is that float
student exported unquantized, the reference row. The cells of one (method, seed) share their float
phase: the first bit width trains it, later ones start QAT from its ``float.pt`` (for methods
without learned adapters, where that is the same computation: the QAT phase seeds itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core import jsonfile
from ..core.errors import EdgekdError
from ..core.fsutil import write_json
from .common import Log

STATUSES = ("ok", "fail", "error", "skipped")
BASELINES = ("ptq", "fp32")  # cells that train nothing: they take a float student from a trained cell


@dataclass(frozen=True)
class Cell:
    bits: int  # 32 for the fp32 reference
    method: str = "hinton"
    seed: int = 0
    tagged: bool = False  # the name carries the seed (a sweep over several seeds)

    @property
    def name(self) -> str:
        base = "fp32" if self.method == "fp32" else f"bits{self.bits}-{self.method}"
        return base + (f"-s{self.seed}" if self.tagged else "")


def cell_paths(root: Path, cell: Cell, profile: str | None) -> dict[str, Path]:
    return {"run": root / "runs" / cell.name, "bundle": root / "bundles" / cell.name,
            "bench": root / "bench" / (profile or "default") / f"{cell.name}.json"}


def _message(e: BaseException) -> str:
    return e.one_line() if isinstance(e, EdgekdError) else f"{type(e).__name__}: {e}"


def _reused(cell: Cell, run_dir: Path, log: Log) -> dict | None:
    if (run_dir / "metrics.json").is_file():
        log(f"{cell.name}: reusing run {run_dir}")
        return jsonfile.read(run_dir / "metrics.json")
    return None


def shares_float_phase(method: str) -> bool:
    """Whether cells of ``method`` may start QAT from another cell's float student: no learned
    adapters carry over from the float phase into QAT (response-based methods and none)."""
    from ..kd import Objective

    return not Objective.single(method).wants_layers


def _distill(cell: Cell, opts, run_dir: Path, float_from: Path | None, log: Log) -> dict:
    from ..config.options import QAT_TEMPERATURE_METHODS, DistillOptions
    from ..models import split_weights
    from .distill import distill

    done = _reused(cell, run_dir, log)
    if done is not None:
        return done
    student, float_epochs = opts.student, opts.float_epochs
    if float_from is not None and (float_from / "float.pt").is_file():
        student, float_epochs = f"{split_weights(opts.student)[0]}={float_from / 'float.pt'}", 0
        log(f"{cell.name}: QAT starts from the float student of {float_from.name}")
    temperature = opts.qat_temp if cell.method in QAT_TEMPERATURE_METHODS else None  # others have no such T
    dopts = DistillOptions(data=opts.data, teacher=opts.teacher, student=student, weight_bits=cell.bits,
                           act_bits=cell.bits, target=opts.target, method=cell.method, epochs=opts.epochs,
                           float_epochs=float_epochs, teacher_epochs=opts.teacher_epochs, seed=cell.seed,
                           qat_temperature=temperature, qat_lr=opts.qat_lr,
                           progress=opts.progress, config=opts.config, layer_bits=list(opts.layer_bits) or None,
                           **opts.read)
    log(f"{cell.name}: distilling into {run_dir}")
    return distill(dopts, out=run_dir, log=lambda s: log(f"{cell.name}: {s}"))


def _quantize(cell: Cell, opts, run_dir: Path, source: Path, log: Log) -> dict:
    from .quantize import QuantizeOptions, quantize

    done = _reused(cell, run_dir, log)
    if done is not None:
        return done
    log(f"{cell.name}: post-training quantization of the float student of {source.name}")
    qopts = QuantizeOptions(weight_bits=cell.bits, act_bits=cell.bits, target=opts.target, seed=cell.seed,
                            layer_bits=list(opts.layer_bits) or None)
    return quantize(source, qopts, out=run_dir, log=lambda s: log(f"{cell.name}: {s}"))


def _export(cell: Cell, opts, run_dir: Path, bundle: Path, log: Log) -> None:
    from ..models import split_weights
    from .deploy import export

    if (bundle / "manifest.json").is_file():
        log(f"{cell.name}: reusing bundle {bundle}")
        return
    log(f"{cell.name}: exporting for {opts.target} into {bundle}")
    export(run_dir, opts.target, out=bundle, log=lambda s: log(f"{cell.name}: {s}"),
           student=split_weights(opts.student)[0], float_model=cell.method == "fp32")


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
        rows = jsonfile.read(file)
    except (OSError, ValueError):
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


def run_cell(cell: Cell, opts, root: Path, settings, budgets, profile: str | None = None, log: Log = lambda s: None,
             source: Path | None = None) -> list[dict]:
    """Bench rows of one cell. ``source``: the run whose float student a baseline cell (ptq, fp32)
    takes, or whose float phase a trained cell reuses (None: train it)."""
    paths = cell_paths(root, cell, profile)
    stage, metrics = ("quantize" if cell.method == "ptq" else "distill"), None
    try:
        if cell.method in BASELINES and source is None:
            raise EdgekdError(f"{cell.method} needs a trained float student",
                              "sweep a trained method too (none or a KD method) at the same seed")
        if cell.method == "ptq":
            metrics = _quantize(cell, opts, paths["run"], source, log)
        elif cell.method == "fp32":
            paths["run"] = source
            metrics = jsonfile.read(source / "metrics.json")
        else:
            metrics = _distill(cell, opts, paths["run"], source, log)
        stage = "export"
        _export(cell, opts, paths["run"], paths["bundle"], log)
        stage = "bench"
        rows = _bench(cell, paths["bundle"], paths["bench"], settings, budgets, profile, log)
    except Exception as e:  # one cell failing must not stop the sweep
        log(f"{cell.name}: {stage} failed: {_message(e)}")
        rows = [_error_row(cell, stage, e, paths["run" if stage in ("distill", "quantize") else "bundle"], metrics)]
    extra = {"cell": cell.name, "method": cell.method, "requested_bits": cell.bits, "seed": cell.seed,
             "distill_seconds": (metrics or {}).get("seconds") if cell.method != "fp32" else None}
    return [r | extra for r in rows]
