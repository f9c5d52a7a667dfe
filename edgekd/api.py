"""The operations behind the CLI as plain functions: train, distill, export.

They return values and raise edgekd.errors types; they never print or exit. ``log`` callbacks
receive one human-readable line at a time (the CLI sends them to stderr).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import EdgekdError, MissingFileError
from .fsutil import BUNDLES_DIR, RUNS_DIR, atomic_dir, latest, write_json, write_text

Log = Callable[[str], None]
DEFAULT_TEACHER = "cnn-teacher"
DEFAULT_STUDENT = "cnn-student"
DEFAULT_TARGET = "onnxruntime-cpu"
# Bumped whenever a built-in architecture changes in a way its weights' shapes do not show
# (e.g. a stride), so that an old cached teacher is never reused with the wrong semantics.
TEACHER_CACHE_VERSION = "v2"


def _quiet(_: str) -> None:
    pass


def _slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(str(p) for p in parts)).strip("-").lower()


def _dataset_name(spec: str) -> str:
    return spec.split(":", 1)[0] if not spec.startswith("npz:") else Path(spec[4:]).stem


# ---- teacher -------------------------------------------------------------------------------------

@dataclass
class TrainOptions:
    data: str = "digits"
    arch: str = DEFAULT_TEACHER
    epochs: int = 20
    lr: float = 2e-3
    batch_size: int = 64
    seed: int = 0
    progress: bool = True


def train(opts: TrainOptions, out: Path | None = None, log: Log = _quiet) -> dict:
    """Train a float model (a teacher) and save it as an edgekd checkpoint; returns its metrics."""
    from . import models, train as tr
    from .data import load_dataset

    tr.set_threads()
    data = load_dataset(opts.data, seed=opts.seed)
    model = models.build_model(opts.arch, data.num_classes, data.input_shape)
    out = Path(out) if out else RUNS_DIR / "teachers" / _slug(TEACHER_CACHE_VERSION, _dataset_name(opts.data), opts.arch, f"s{opts.seed}",
                                                              f"e{opts.epochs}")
    log(f"training {opts.arch} ({models.count_params(model):,} parameters) on {opts.data} for {opts.epochs} epochs")
    cfg = tr.FitConfig(epochs=opts.epochs, lr=opts.lr, batch_size=opts.batch_size, seed=opts.seed,
                       flip=data.flip_augment, progress=opts.progress, desc="teacher")
    from .losses import make_loss

    result = tr.fit(model, data, cfg, make_loss("none"), on_epoch=lambda r: log(_epoch_line("teacher", r)))
    metrics = {"accuracy": tr.accuracy(model, data.test), "val_accuracy": result.best_val_accuracy,
               "best_epoch": result.best_epoch, "seconds": result.seconds, "history": result.history,
               "params": models.count_params(model), **{k: v for k, v in asdict(opts).items() if k != "progress"}}
    meta = _model_meta(opts.arch, data, opts.data, opts.seed) | {"accuracy": metrics["accuracy"]}
    with atomic_dir(out) as tmp:
        models.save_checkpoint(tmp / "model.pt", model.state_dict(), meta)
        write_json(tmp / "metrics.json", metrics)
    log(f"teacher test accuracy {metrics['accuracy']:.4f}; saved {out / 'model.pt'}")
    return metrics | {"path": str(out / "model.pt")}


def _model_meta(arch: str, data, data_spec: str, seed: int) -> dict:
    return {"arch": arch, "num_classes": data.num_classes, "input_shape": list(data.input_shape),
            "dataset": data_spec, "seed": seed, "classes": data.classes,
            "normalization": {"mean": data.mean, "std": data.std}, "edgekd_version": __version__}


def _epoch_line(what: str, r: dict) -> str:
    star = " *" if r.get("best") else ""
    return (f"{what} epoch {r['epoch']}: loss {r['loss']:.4f}, train acc {r['train_accuracy']:.4f}, "
            f"val acc {r['val_accuracy']:.4f} ({r['seconds']:.0f}s){star}")


def resolve_teacher(spec: str | None, data, opts: "DistillOptions", log: Log):
    """A teacher model: a checkpoint file, or an architecture trained once and cached."""
    from . import models

    if spec and Path(spec).is_file():
        model, meta = models.load_model(spec, expect_classes=data.num_classes)
        _check_same_input(meta, data, spec)
        return model, meta.get("accuracy"), spec
    if spec and (spec.endswith((".pt", ".pth", ".safetensors")) or "/" in spec):
        raise MissingFileError(f"teacher checkpoint not found: {spec}", "check the path, or train one with 'edgekd train'")
    arch = spec or DEFAULT_TEACHER
    topts = TrainOptions(data=opts.data, arch=arch, epochs=opts.teacher_epochs, seed=opts.seed, progress=opts.progress)
    path = RUNS_DIR / "teachers" / _slug(TEACHER_CACHE_VERSION, _dataset_name(opts.data), arch, f"s{opts.seed}", f"e{opts.teacher_epochs}") / "model.pt"
    if path.is_file():
        log(f"reusing teacher {path}")
    else:
        path = Path(train(topts, out=path.parent, log=log)["path"])
    model, meta = models.load_model(path, expect_classes=data.num_classes)
    return model, meta.get("accuracy"), str(path)


def _check_same_input(meta: dict, data, source: str) -> None:
    from .errors import IncompatibleError

    if tuple(meta["input_shape"]) != tuple(data.input_shape):
        raise IncompatibleError(f"teacher {source} takes inputs of shape {tuple(meta['input_shape'])} but the dataset's "
                                f"are {tuple(data.input_shape)}", "use a teacher trained on the same dataset")


# ---- distill -------------------------------------------------------------------------------------

@dataclass
class DistillOptions:
    data: str = "digits"
    teacher: str | None = None
    student: str = DEFAULT_STUDENT
    weight_bits: int = 8
    act_bits: int = 8
    target: str = DEFAULT_TARGET
    method: str = "hinton"
    temperature: float = 4.0
    alpha: float = 0.9
    epochs: int = 8  # QAT epochs
    float_epochs: int = 8  # float KD epochs first: QAT then starts from a trained float student
    teacher_epochs: int = 20
    lr: float = 2e-3
    qat_lr: float | None = None  # None: lr / 4 after a float warm start, lr without one
    batch_size: int = 64
    first_last_bits: int | None = 8
    seed: int = 0
    progress: bool = True


def distill(opts: DistillOptions, out: Path | None = None, log: Log = _quiet) -> dict:
    """Quantized distillation: KD from the teacher while training the student with Brevitas QAT."""
    from . import catalog, models, quant, train as tr
    from .data import load_dataset
    from .losses import make_loss

    tr.set_threads()
    target = catalog.load_target(opts.target)
    spec = quant.spec_for_target(target, opts.weight_bits, opts.act_bits, opts.first_last_bits)
    if spec.weight_bits != opts.weight_bits or spec.first_last_bits != opts.first_last_bits:
        log(f"warning: target {target.name} uses reduce_range: weights are trained with at most 7 bits "
            f"(W{spec.weight_bits}, first/last layers {spec.first_last_bits or spec.weight_bits}) because ONNX "
            "Runtime's x86 int8 kernels saturate with 8-bit weights on CPUs without VNNI; on ARM use --target rpi")
    for finding in _preflight(target, spec):
        log(f"{finding['level']}: {finding['message']}")
    loss = make_loss(opts.method, **({"temperature": opts.temperature, "alpha": opts.alpha} if opts.method == "hinton" else {}))
    data = load_dataset(opts.data, seed=opts.seed)
    student = models.build_model(opts.student, data.num_classes, data.input_shape)
    teacher, teacher_acc = None, None
    if loss.needs_teacher:
        teacher, teacher_acc, teacher_src = resolve_teacher(opts.teacher, data, opts, log)
        if teacher_acc is None:
            teacher_acc = tr.accuracy(teacher, data.test)
        log(f"teacher {teacher_src}: test accuracy {teacher_acc:.4f}")
    name = _slug(_dataset_name(opts.data), opts.student, spec.label.lower(), opts.method)
    out = Path(out) if out else RUNS_DIR / name
    float_epochs = opts.float_epochs
    history, float_acc, float_seconds, lines = [], None, 0.0, []
    logf = lambda s: (lines.append(s), log(s))
    if float_epochs:
        cfg = tr.FitConfig(epochs=float_epochs, lr=opts.lr, batch_size=opts.batch_size, seed=opts.seed,
                           flip=data.flip_augment, progress=opts.progress, desc="float student")
        res = tr.fit(student, data, cfg, loss, teacher, on_epoch=lambda r: logf(_epoch_line("float", r)))
        float_acc, float_seconds = tr.accuracy(student, data.test), res.seconds
        history += [dict(r, phase="float") for r in res.history]
        logf(f"float student test accuracy {float_acc:.4f}")
    qmodel = quant.quantize(student, spec)
    qat_lr = opts.qat_lr or (opts.lr / 4 if float_epochs else opts.lr)
    cfg = tr.FitConfig(epochs=opts.epochs, lr=qat_lr, batch_size=opts.batch_size, seed=opts.seed + 1,
                       flip=data.flip_augment, progress=opts.progress, desc=f"QAT {spec.label}")
    res = tr.fit(qmodel, data, cfg, loss, teacher, on_epoch=lambda r: logf(_epoch_line(spec.label, r)))
    history += [dict(r, phase="qat") for r in res.history]
    student_acc = tr.accuracy(qmodel, data.test)
    logf(f"{spec.label} student test accuracy (fake-quant, PyTorch) {student_acc:.4f}")
    metrics = {"teacher_accuracy": teacher_acc, "student_accuracy": student_acc, "student_float_accuracy": float_acc,
               "val_accuracy": res.best_val_accuracy, "weight_bits": spec.weight_bits, "act_bits": spec.act_bits,
               "method": opts.method, "epochs": opts.epochs, "float_epochs": float_epochs, "dataset": opts.data,
               "student": opts.student, "student_params": models.count_params(student), "target": target.name,
               "seconds": res.seconds + float_seconds,
               "history": history}
    meta = _model_meta(opts.student, data, opts.data, opts.seed) | {"quant": spec.to_dict(), "target": target.name}
    recipe = asdict(opts) | {"float_epochs": float_epochs, "qat_lr": qat_lr, "target": target.name}
    recipe.pop("progress")
    with atomic_dir(out) as tmp:
        models.save_checkpoint(tmp / "student.pt", qmodel.state_dict(), meta)
        write_json(tmp / "recipe.json", recipe)
        write_json(tmp / "metrics.json", metrics)
        write_text(tmp / "log.txt", "\n".join(lines) + "\n")
    return metrics | {"run_dir": str(out)}


def _preflight(target, spec) -> list[dict]:
    from . import catalog

    check = getattr(catalog, "preflight", None)
    return check(target, spec.weight_bits, spec.act_bits) if check else []


def load_student(run_dir: Path):
    """Rebuild the quantized student of a run directory, with its trained weights and scales."""
    from . import models, quant

    ckpt_path = Path(run_dir) / "student.pt"
    ckpt = models.load_checkpoint(ckpt_path)
    meta = ckpt["meta"]
    if "quant" not in meta:
        raise EdgekdError(f"{ckpt_path} is not a distilled student (no quantization spec)",
                          "pass a run directory written by 'edgekd distill'")
    float_model = models.build_model(meta["arch"], meta["num_classes"], tuple(meta["input_shape"]))
    qmodel = quant.quantize(float_model, quant.QuantSpec(**meta["quant"]))
    quant.materialize(qmodel, meta["input_shape"])
    models.load_weights(qmodel, ckpt["state_dict"], str(ckpt_path))
    qmodel.eval()
    return qmodel, meta


def find_run(run_dir: str | Path | None) -> Path:
    if run_dir is None:
        found = latest(RUNS_DIR, "student.pt")
        if found is None:
            raise MissingFileError("no distilled run found under runs/", "run 'edgekd distill' first, or pass RUN_DIR")
        return found
    run_dir = Path(run_dir)
    if not (run_dir / "student.pt").is_file():
        raise MissingFileError(f"{run_dir} is not a run directory (no student.pt)",
                               "pass a directory written by 'edgekd distill'")
    return run_dir


# ---- export --------------------------------------------------------------------------------------

def export(run_dir: str | Path | None, target_name: str, out: Path | None = None, log: Log = _quiet) -> dict:
    """Export, compile and validate a distilled student for a target; returns the manifest."""
    import numpy as np
    import torch

    from . import catalog
    from . import export as ex
    from .data import load_dataset

    run_dir = find_run(run_dir)
    target = catalog.load_target(target_name)
    qmodel, meta = load_student(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if target.backend == "tensorrt":
        raise EdgekdError(f"target {target.name} builds a TensorRT engine, which edgekd cannot do yet",
                          "use an ONNX Runtime target (e.g. --target cpu)")
    data = load_dataset(meta["dataset"], seed=meta["seed"])
    if [data.mean, data.std] != [meta["normalization"]["mean"], meta["normalization"]["std"]]:
        raise EdgekdError(f"the dataset {meta['dataset']} no longer matches the run's normalization",
                          "export on the machine and data the student was distilled with")
    x, y = data.test.x, data.test.y
    with torch.no_grad():
        reference = torch.cat([qmodel(torch.from_numpy(x[i: i + 512])) for i in range(0, len(x), 512)]).numpy()
    name = f"{run_dir.name}-{target.name}"
    out = Path(out) if out else BUNDLES_DIR / name
    with atomic_dir(out) as tmp:
        started = time.perf_counter()
        ex.export_onnx(qmodel, target.flavour, torch.from_numpy(x[:1]), tmp / "model.onnx", target.opset)
        artifact, fusion = _compile(target, tmp, log)
        log(f"exported {target.flavour} ONNX and compiled for {target.backend} in {time.perf_counter() - started:.1f}s")
        runtime = ex.run_artifact(target.backend, artifact, x)
        report = ex.parity(reference, runtime, y)
        log(f"parity on {report['n']} test samples: top-1 agreement {report['top1_agreement']:.4f}, "
            f"max abs diff {report['max_abs_diff']:.3g}")
        ex.check_parity(report, target.tolerance, f"the {target.name} artifact")
        np.savez_compressed(tmp / "eval.npz", x=x, y=y)
        manifest = ex.manifest_base(target, meta, metrics) | {
            "name": out.name, "model_file": artifact.name, "run_dir": str(run_dir),
            "torch_accuracy": report["torch_accuracy"], "runtime_accuracy": report["runtime_accuracy"],
            "parity": {k: report[k] for k in ("n", "top1_agreement", "max_abs_diff", "mean_abs_diff", "disagreements")},
            "fusion": fusion, "files": ex.file_hashes(tmp)}
        write_json(tmp / "manifest.json", manifest)
    return manifest | {"bundle_dir": str(out)}


def _compile(target, bundle: Path, log: Log):
    """The target's compile step; returns (artifact to run, fusion report or None)."""
    if target.backend != "onnxruntime":
        return bundle / "model.onnx", None
    from .backends import onnxruntime as ortb

    level = target.options.get("graph_optimization_level", "basic")
    artifact = ortb.optimize(bundle / "model.onnx", bundle / "model.opt.onnx", level=level)
    fusion = ortb.fusion_report(artifact)
    return Path(artifact), fusion
