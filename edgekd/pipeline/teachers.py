"""Teachers: train a float model (``edgekd train``), and find the teacher(s) a distillation uses,
from a checkpoint file or an architecture trained once and cached under runs/teachers/."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from ..config.options import DEFAULT_TEACHER, TrainOptions
from ..core.errors import CheckpointError, IncompatibleError, MissingFileError
from ..core.fsutil import RUNS_DIR, TEACHER_FORMAT, atomic_dir, check_output, check_partial, write_json
from .common import (Log, data_inputs, data_options, dataset_name, epoch_line, join_group, load_data, model_meta,
                     options_dict, quiet, slug)

PYTHON_API = "python-api"  # what a run records as its dataset or model when the Python API gave them as objects

# Bumped whenever a built-in architecture changes in a way its weights' shapes do not show
# (e.g. a stride), so that an old cached teacher is never reused with the wrong semantics.
TEACHER_CACHE_VERSION = "v3"  # v3: the teacher recipe (SGD, label smoothing) and cnnfc-teacher


def train(opts: TrainOptions, out: Path | None = None, log: Log = quiet, resume: bool | str = False,
          overwrite: bool = False, tensorboard: bool = False, data=None) -> dict:
    """Train a float model (a teacher) and save it as an edgekd checkpoint; returns its metrics.

    ``resume``: True continues an interrupted run (training.checkpoint), "auto" does so when its
    checkpoints match these options. Under torchrun every rank trains (DDP), rank 0 writes.
    ``out`` obeys the output-path rule (core.fsutil.check_output; ``overwrite``) and is locked
    while it is written. The teacher dir gets ``metrics.csv`` and ``curves.png``; ``tensorboard``
    also writes TensorBoard events as epochs finish (training.curves). ``data``: an api.TorchData
    (torch Datasets and their class names) to train on instead of ``opts.data`` (recorded as python-api)."""
    from .. import models
    from ..config import options as op
    from ..core.locks import write_lock
    from ..training import distributed as dd
    from ..training.checkpoint import partial_dir

    if data is not None:
        opts = replace(opts, data=PYTHON_API)
    op.validate(opts)
    out = Path(out) if out else teacher_dir(opts.data, opts.arch, opts.seed, opts.epochs, data_options(opts),
                                            teacher_recipe(opts))
    check_output(out, "teacher", [*data_inputs(opts.data), models.split_weights(opts.arch)[1]], overwrite)
    check_partial(partial_dir(out), overwrite, resume is True)
    joined, loud = join_group(opts)
    try:
        with ExitStack() as held:
            if dd.is_main():
                held.enter_context(write_lock(out, "teacher"))
            return _train(opts, out, log if loud else quiet, resume, tensorboard, data)
    finally:
        if joined:
            dd.shutdown()


def _train(opts: TrainOptions, out: Path | None, log: Log, resume: bool | str, tensorboard: bool = False,
           torch_data=None) -> dict:
    from .. import models
    from ..training import loop as tr
    from ..training.evaluate import accuracy
    from ..kd import make_loss
    from ..training import distributed as dd
    from ..training.checkpoint import RunCheckpoints, partial_dir
    from ..training.curves import TensorBoard, tensorboard_dir, write_curves

    import torch

    tr.set_threads()
    data = load_data(opts.data, opts.seed, data_options(opts), torch_data)
    torch.manual_seed(opts.seed)  # the initial weights depend on the seed alone, not on the process
    built = models.from_spec(opts.arch, data.num_classes, data.input_shape, student=True, log=log, role="arch")
    model = built.model
    out = Path(out) if out else teacher_dir(opts.data, opts.arch, opts.seed, opts.epochs, data_options(opts),
                                            teacher_recipe(opts))
    ckpts = RunCheckpoints(partial_dir(out), options_dict(opts), resume, log)
    log(f"training {opts.arch} ({models.count_params(model):,} parameters) on {opts.data} for {opts.epochs} epochs"
        + (f" on {dd.world()} processes" if dd.world() > 1 else ""))
    cfg = tr.FitConfig(epochs=opts.epochs, lr=opts.lr, batch_size=opts.batch_size, seed=opts.seed,
                       flip=data.flip_augment, progress=opts.progress, desc="teacher", device=opts.device, amp=opts.amp,
                       optimizer=opts.optimizer, log=log)
    board = TensorBoard(tensorboard_dir(out), "teacher") if tensorboard and dd.is_main() else None
    if board is not None:
        log(f"tensorboard: events in {board.logdir} (tensorboard --logdir {board.logdir.parent})")
    try:
        result = tr.fit(model, data, cfg, make_loss("ce", label_smoothing=opts.label_smoothing),
                        checkpoint=ckpts.phase("teacher"),
                        on_epoch=lambda r: (log(epoch_line("teacher", r)), board and board.epoch(r)))
    finally:
        if board is not None:
            board.close()
    metrics = {"accuracy": accuracy(model, data.test, sharded=True), "val_accuracy": result.best_val_accuracy,
               "best_epoch": result.best_epoch, "seconds": result.seconds, "history": result.history,
               "params": models.count_params(model), "processes": dd.world(), **options_dict(opts),
               "bad_images": len(data.bad_images()), "init_weights": built.weights}
    meta = model_meta(built.arch, data, opts.data, opts.seed) | {"accuracy": metrics["accuracy"],
                                                                 "init_weights": built.weights}
    if dd.is_main():
        with atomic_dir(out) as tmp:
            models.save_checkpoint(tmp / "model.pt", model.state_dict(), meta)
            write_json(tmp / "metrics.json", {"format": TEACHER_FORMAT} | metrics)
            write_curves(tmp, result.history, log, "teacher", title=f"{out.name}: {opts.arch} on {opts.data}")
    ckpts.finish()
    log(f"teacher test accuracy {metrics['accuracy']:.4f}; saved {out / 'model.pt'}")
    return metrics | {"path": str(out / "model.pt")}


def teacher_dir(data: str, arch: str, seed: int, epochs: int, options=None, recipe: dict | None = None) -> Path:
    """Where ``train`` keeps a teacher by default, and where ``distill`` looks for one to reuse.
    ``options`` (data.DataOptions): read otherwise than by default, or from an image folder, the data
    gets a key of its own (a hash of the spec and the options that decide the pixels); so does a
    training ``recipe`` (lr, batch_size, optimizer, label_smoothing) other than the defaults."""
    import hashlib
    import json

    from ..data.options import DataOptions

    record = (options or DataOptions()).record()
    parts = [TEACHER_CACHE_VERSION, dataset_name(data), arch.replace("=", "-from-"), f"s{seed}", f"e{epochs}"]
    if recipe and recipe != teacher_recipe(TrainOptions()):
        parts.append("r" + hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:6])
    if record != DataOptions().record() or data.startswith("imagefolder:"):
        where = str(Path(data.partition(":")[2]).resolve()) if data.startswith("imagefolder:") else data
        key = json.dumps([where, record], sort_keys=True)
        parts.append(hashlib.sha256(key.encode()).hexdigest()[:8])
    return RUNS_DIR / "teachers" / slug(*parts)


def teacher_recipe(opts: TrainOptions) -> dict:
    """What besides architecture, data, seed and epochs decides a trained teacher."""
    return {"lr": opts.lr, "batch_size": opts.batch_size, "optimizer": opts.optimizer,
            "label_smoothing": opts.label_smoothing}


def resolve_teacher(spec: str | None, data, opts, log: Log, trust_code: bool = False):
    """A teacher model: a checkpoint file (``ARCH=FILE``: the architecture given with it), or an
    architecture trained once and cached. A file naming code is refused unless ``trust_code``."""
    from .. import models

    arch, file = models.split_weights(spec) if spec else (None, None)
    if file is not None:
        model, meta = load_teacher_file(spec, data, trust_code)
        return model, meta.get("accuracy"), file
    arch = arch or DEFAULT_TEACHER
    if data.name == PYTHON_API:
        raise IncompatibleError(f"no teacher given for data from the Python API (edgekd would train a {arch} on it, "
                                "but it caches teachers only for data specs)",
                                "pass teacher= (an nn.Module or ARCH=WEIGHTS), or train one first with api.train")
    dopts = data_options(opts)
    topts = TrainOptions(data=opts.data, arch=arch, epochs=opts.teacher_epochs, seed=opts.seed, progress=opts.progress,
                         device=opts.device, amp=opts.amp, **vars(dopts))
    path = teacher_dir(opts.data, arch, opts.seed, opts.teacher_epochs, dopts) / "model.pt"
    if path.is_file():
        log(f"reusing teacher {path}")
    else:
        # a teacher's options define it fully: an interrupted teacher run with the same options continues
        path = Path(train(topts, out=path.parent, log=log, resume="auto")["path"])
    try:
        model, meta = models.load_model(path, expect_classes=data.num_classes, arch=arch)
    except CheckpointError as e:
        raise CheckpointError(f"the cached teacher in {path.parent} is damaged: {e.message}",
                              f"delete {path.parent} and run again to train it anew") from None
    return model, meta.get("accuracy"), str(path)


def load_teacher_file(spec: str, data, trust_code: bool = False):
    """(model, metadata) of a teacher given as a file, or as ``ARCH=FILE`` (the architecture named on
    the command line, the weights from the file)."""
    from .. import models

    arch, file = models.split_weights(spec)
    if Path(file).is_dir():
        raise MissingFileError(f"teacher {file} is a directory, not a checkpoint file",
                               f"pass the checkpoint inside it, e.g. --teacher {Path(file) / 'model.pt'}")
    models.check_input(Path(file), "teacher checkpoint")  # missing, a FIFO, a device, a link loop
    if arch is not None:  # the architecture named here; the file's own metadata (if any) is not trusted for it
        return models.from_spec(spec, data.num_classes, data.input_shape, student=False).model, {}
    model, meta = models.load_model(file, expect_classes=data.num_classes, trust_code=trust_code)
    check_same_input(meta, data, file)
    return model, meta


def resolve_teachers(opts, data, log: Log, trust_code: bool = False, modules=None):
    """One teacher, or several averaged into a training.schemes.Ensemble (``teacher_weights``, ``teacher_mix``).
    ``modules``: teachers given as nn.Modules (the Python API), used instead of ``opts.teacher``.

    Every teacher loaded from a file or given as a module is measured on the test split before any
    training (whatever accuracy its file records: it may have seen other data or another
    normalization); one near chance stops the run (``check_teacher``) unless ``opts.force``. A teacher
    edgekd trained on this data (cached) keeps the accuracy it recorded."""
    from .. import models
    from ..training import accuracy
    from ..training.schemes import Ensemble

    if modules:
        found = [(m.eval(), None, "python-api", True) for m in modules]
    else:
        found = [(*resolve_teacher(spec, data, opts, log, trust_code), bool(spec and models.split_weights(spec)[1]))
                 for spec in teacher_specs(opts.teacher)]
    measured = []
    for model, acc, src, loaded in found:
        if loaded:
            acc = accuracy(model, data.test)
            log(f"info: teacher {src}: test accuracy {acc:.4f} (measured before training)")
            check_teacher(acc, data, src, getattr(opts, "force", False), log)
        else:
            acc = acc if acc is not None else accuracy(model, data.test)
            log(f"teacher {src}: test accuracy {acc:.4f}")
        measured.append((model, acc, src))
    if len(measured) == 1 and not opts.teacher_weights:
        return measured[0]
    check_teacher_weights(opts.teacher_weights)
    model = Ensemble([m for m, _, _ in measured], opts.teacher_weights, opts.teacher_mix).eval()
    acc = accuracy(model, data.test)
    log(f"teacher ensemble of {len(measured)} ({opts.teacher_mix} averaged): test accuracy {acc:.4f}")
    return model, acc, "+".join(src for _, _, src in measured)


def check_teacher_weights(weights) -> None:
    """Ensemble weights whose sum a float holds (1e308 twice sums to inf: every target would be NaN)."""
    import math

    if weights and not math.isfinite(sum(float(w) for w in weights)):
        from ..core.errors import ConfigError

        raise ConfigError(f"the teacher weights {weights} sum past what a float holds",
                          "give weights of sensible size, e.g. 1 and 2 (only their ratios matter)")


NEAR_CHANCE = 1.5  # a teacher below NEAR_CHANCE / num_classes test accuracy teaches nothing


def check_teacher(acc: float, data, source: str, force: bool = False, log: Log = quiet) -> None:
    """Stop when the teacher's test accuracy is near chance: what it would teach is noise, and the
    cause is almost always how the data reaches it (``force``: warn and go on)."""
    chance = 1.0 / data.num_classes
    if acc >= NEAR_CHANCE * chance:
        return
    message = (f"teacher {source}: test accuracy {acc:.2%} is near chance ({data.num_classes} classes: "
               f"{chance:.2%})")
    if force:
        log(f"warning: {message}; distilling anyway (--force)")
        return
    shown = ", ".join(data.classes[:4]) + (", ..." if data.num_classes > 4 else "")
    size = "x".join(str(d) for d in data.input_shape[1:])
    raise IncompatibleError(message, f"likely causes: the normalization (now mean {data.mean}, std {data.std}; "
                            "--normalize imagenet for torchvision/timm weights, or --normalize MEAN/STD as trained), "
                            f"the class order (the teacher's outputs must follow the data's: {shown}), or the image size "
                            f"(now {size}; --image-size as trained); --force distills anyway")


def teacher_specs(teacher) -> list[str | None]:
    """The teacher specs of ``--teacher`` (None: the default teacher); each must be a non-empty model
    spec (a recipe's ``teacher = [1]`` or ``teacher = ""`` is one error, not a traceback or the default)."""
    specs = [teacher] if teacher is None or isinstance(teacher, str) else list(teacher) or [None]
    for spec in specs:
        if spec is not None and (not isinstance(spec, str) or not spec.strip()):
            from ..config.options import shown
            from ..core.errors import ConfigError

            raise ConfigError(f"teacher must be a model spec (a checkpoint file, ARCH=WEIGHTS or an architecture), "
                              f"got {shown(spec)}", "e.g. --teacher runs/teachers/NAME/model.pt, or leave it out "
                                                    "to train the default teacher")
    return specs


def check_same_input(meta: dict, data, source: str) -> None:
    if tuple(meta["input_shape"]) != tuple(data.input_shape):
        raise IncompatibleError(f"teacher {source} takes inputs of shape {tuple(meta['input_shape'])} but the dataset's "
                                f"are {tuple(data.input_shape)}", "use a teacher trained on the same dataset")
