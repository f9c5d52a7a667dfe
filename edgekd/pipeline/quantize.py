"""Quantize: post-training quantization of a trained float model into a run directory.

The baseline against which distillation and QAT are measured: a float model (the float student
a ``distill`` run saved as ``float.pt``, a model trained with ``edgekd train``, or an edgekd
checkpoint file) quantized with Brevitas at the target's conventions, its activation ranges
calibrated on training images, its biases corrected (``quant.ptq``). Nothing is trained. The
result is a run directory like ``distill``'s (``method: ptq``), so ``export`` and ``sweep`` take it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..config import options as op
from ..core.errors import MissingFileError
from ..core.fsutil import RUN_FORMAT, RUNS_DIR, atomic_dir, check_output, write_json, write_text
from .common import Log, dataset_name, model_meta, quiet, slug
from .distill import quant_spec

FLOAT_FILES = ("float.pt", "model.pt")  # a distill run's float student, an `edgekd train` model


@dataclass
class QuantizeOptions:
    weight_bits: int = op.default("weight_bits")
    act_bits: int = op.default("act_bits")
    target: str = op.default("target")
    first_last_bits: int | str = op.default("first_last_bits")
    layer_bits: list | None = None  # per-layer rules (quant.layerbits): --layer-bits PATTERN=WxAy
    calib_samples: int = op.default("calib_samples")  # training images the activation ranges are calibrated on
    bias_correction: bool = True
    seed: int = op.default("seed")
    trust_code: bool = False  # a checkpoint whose architecture is module:callable may be rebuilt


def float_source(source: str | Path) -> Path:
    """The float model file of ``source``: a run or train directory, or a checkpoint file."""
    path = Path(source)
    if path.is_dir():
        for name in FLOAT_FILES:
            if (path / name).is_file():
                return path / name
        raise MissingFileError(f"{path} holds no float model ({' or '.join(FLOAT_FILES)})",
                               "pass a run written by 'edgekd distill' with a float phase, a directory written by "
                               "'edgekd train', or a checkpoint file")
    if not path.is_file():
        raise MissingFileError(f"no such model or run: {path}", "pass a run directory or a checkpoint file")
    return path


def quantize(source: str | Path, opts: QuantizeOptions, out: Path | None = None, log: Log = quiet,
             overwrite: bool = False) -> dict:
    """Post-training quantization of the float model of ``source``; returns the run's metrics."""
    import torch

    from .. import models
    from ..quant import layerbits
    from ..quant.ptq import post_training_quantize
    from .evalset import read_test_split
    from ..training import accuracy, set_threads

    set_threads()
    op.check_bits(opts.weight_bits, opts.act_bits)
    op.check("first_last_bits", opts.first_last_bits)
    op.check("seed", opts.seed)
    op.check("calib_samples", opts.calib_samples)
    op.check("layer_bits", opts.layer_bits)
    path = float_source(source)
    target, spec = quant_spec(_as_distill(opts), log)
    model, meta = models.load_model(path, trust_code=opts.trust_code)
    layerbits.check(model, spec)  # a pattern that names no layer fails before calibration
    out = Path(out) if out else RUNS_DIR / slug(dataset_name(meta["dataset"]), meta["arch"], spec.label.lower(),
                                                *(["mixed"] if spec.layer_bits else []), "ptq")
    check_output(out, "run", [path.parent if path.name in FLOAT_FILES else path], overwrite)
    data = read_test_split(meta)  # as the float model saw it (its recorded data options and normalization)
    float_acc = accuracy(model, data.test)
    n = min(opts.calib_samples, len(data.train))
    pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(opts.seed))[:n]
    calib = torch.from_numpy(data.train.take(pick.numpy()))
    started = time.perf_counter()
    qmodel = post_training_quantize(model, spec, calib, bias_correction=opts.bias_correction)
    seconds = time.perf_counter() - started
    acc = accuracy(qmodel, data.test)
    log(f"{spec.label} post-training quantization of {path} on {n} calibration images "
        f"({'with' if opts.bias_correction else 'without'} bias correction) in {seconds:.1f}s: test accuracy "
        f"{acc:.4f} (float {float_acc:.4f})")
    metrics = {"teacher_accuracy": None, "student_accuracy": acc, "student_float_accuracy": float_acc,
               "weight_bits": spec.weight_bits, "act_bits": spec.act_bits, "layer_bits": spec.layer_rules_text,
               "method": "ptq", "epochs": 0,
               "float_epochs": 0, "dataset": meta["dataset"], "student": meta["arch"],
               "student_params": models.count_params(model), "target": target.name, "source": str(path),
               "calib_samples": n, "bias_correction": opts.bias_correction, "seconds": seconds, "history": []}
    with atomic_dir(out) as tmp:
        full = model_meta(meta["arch"], data, meta["dataset"], meta["seed"])
        models.save_checkpoint(tmp / "student.pt", qmodel.state_dict(),
                               full | {"quant": spec.to_dict(), "target": target.name})
        write_json(tmp / "recipe.json", {"method": "ptq", "source": str(path), **vars(opts),
                                         **layerbits.record(qmodel, log)})
        write_json(tmp / "metrics.json", {"format": RUN_FORMAT} | metrics)
        write_text(tmp / "log.txt", f"ptq {spec.label} from {path}: test accuracy {acc:.4f}\n")
    return metrics | {"run_dir": str(out)}


def _as_distill(opts: QuantizeOptions):
    """The distill options quant_spec reads (bits, target, first/last layers, per-layer rules)."""
    return op.DistillOptions(weight_bits=opts.weight_bits, act_bits=opts.act_bits, target=opts.target,
                             first_last_bits=opts.first_last_bits, layer_bits=opts.layer_bits)
