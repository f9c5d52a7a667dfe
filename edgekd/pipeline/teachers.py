"""Teachers: train a float model (``edgekd train``), and find the teacher(s) a distillation uses,
from a checkpoint file or an architecture trained once and cached under runs/teachers/."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from ..config.options import DEFAULT_TEACHER, TrainOptions
from ..core.errors import CheckpointError, IncompatibleError, MissingFileError
from ..core.fsutil import RUNS_DIR, TEACHER_FORMAT, atomic_dir, check_output, check_partial, write_json
from .common import Log, data_inputs, dataset_name, epoch_line, join_group, model_meta, options_dict, quiet, slug

# Bumped whenever a built-in architecture changes in a way its weights' shapes do not show
# (e.g. a stride), so that an old cached teacher is never reused with the wrong semantics.
TEACHER_CACHE_VERSION = "v2"


def train(opts: TrainOptions, out: Path | None = None, log: Log = quiet, resume: bool | str = False,
          overwrite: bool = False, tensorboard: bool = False) -> dict:
    """Train a float model (a teacher) and save it as an edgekd checkpoint; returns its metrics.

    ``resume``: True continues an interrupted run (training.checkpoint), "auto" does so when its
    checkpoints match these options. Under torchrun every rank trains (DDP), rank 0 writes.
    ``out`` obeys the output-path rule (core.fsutil.check_output; ``overwrite``) and is locked
    while it is written. The teacher dir gets ``metrics.csv`` and ``curves.png``; ``tensorboard``
    also writes TensorBoard events as epochs finish (training.curves)."""
    from ..config import options as op
    from ..core.locks import write_lock
    from ..training import distributed as dd
    from ..training.checkpoint import partial_dir

    op.validate(opts)
    out = Path(out) if out else teacher_dir(opts.data, opts.arch, opts.seed, opts.epochs)
    check_output(out, "teacher", data_inputs(opts.data), overwrite)
    check_partial(partial_dir(out), overwrite, resume is True)
    joined, loud = join_group(opts)
    try:
        with ExitStack() as held:
            if dd.is_main():
                held.enter_context(write_lock(out, "teacher"))
            return _train(opts, out, log if loud else quiet, resume, tensorboard)
    finally:
        if joined:
            dd.shutdown()


def _train(opts: TrainOptions, out: Path | None, log: Log, resume: bool | str, tensorboard: bool = False) -> dict:
    from .. import models
    from ..training import loop as tr
    from ..training.evaluate import accuracy
    from ..data import load_dataset
    from ..kd import make_loss
    from ..training import distributed as dd
    from ..training.checkpoint import RunCheckpoints, partial_dir
    from ..training.curves import TensorBoard, tensorboard_dir, write_curves

    import torch

    tr.set_threads()
    data = load_dataset(opts.data, seed=opts.seed)
    torch.manual_seed(opts.seed)  # the initial weights depend on the seed alone, not on the process
    model = models.build_model(opts.arch, data.num_classes, data.input_shape)
    out = Path(out) if out else teacher_dir(opts.data, opts.arch, opts.seed, opts.epochs)
    ckpts = RunCheckpoints(partial_dir(out), options_dict(opts), resume, log)
    log(f"training {opts.arch} ({models.count_params(model):,} parameters) on {opts.data} for {opts.epochs} epochs"
        + (f" on {dd.world()} processes" if dd.world() > 1 else ""))
    cfg = tr.FitConfig(epochs=opts.epochs, lr=opts.lr, batch_size=opts.batch_size, seed=opts.seed,
                       flip=data.flip_augment, progress=opts.progress, desc="teacher", device=opts.device, amp=opts.amp)
    board = TensorBoard(tensorboard_dir(out), "teacher") if tensorboard and dd.is_main() else None
    if board is not None:
        log(f"tensorboard: events in {board.logdir} (tensorboard --logdir {board.logdir.parent})")
    try:
        result = tr.fit(model, data, cfg, make_loss("none"), checkpoint=ckpts.phase("teacher"),
                        on_epoch=lambda r: (log(epoch_line("teacher", r)), board and board.epoch(r)))
    finally:
        if board is not None:
            board.close()
    metrics = {"accuracy": accuracy(model, data.test, sharded=True), "val_accuracy": result.best_val_accuracy,
               "best_epoch": result.best_epoch, "seconds": result.seconds, "history": result.history,
               "params": models.count_params(model), "processes": dd.world(), **options_dict(opts)}
    meta = model_meta(opts.arch, data, opts.data, opts.seed) | {"accuracy": metrics["accuracy"]}
    if dd.is_main():
        with atomic_dir(out) as tmp:
            models.save_checkpoint(tmp / "model.pt", model.state_dict(), meta)
            write_json(tmp / "metrics.json", {"format": TEACHER_FORMAT} | metrics)
            write_curves(tmp, result.history, log, "teacher", title=f"{out.name}: {opts.arch} on {opts.data}")
    ckpts.finish()
    log(f"teacher test accuracy {metrics['accuracy']:.4f}; saved {out / 'model.pt'}")
    return metrics | {"path": str(out / "model.pt")}


def teacher_dir(data: str, arch: str, seed: int, epochs: int) -> Path:
    """Where ``train`` keeps a teacher by default, and where ``distill`` looks for one to reuse."""
    return RUNS_DIR / "teachers" / slug(TEACHER_CACHE_VERSION, dataset_name(data), arch, f"s{seed}", f"e{epochs}")


def resolve_teacher(spec: str | None, data, opts, log: Log, trust_code: bool = False):
    """A teacher model: a checkpoint file (``ARCH=FILE``: the architecture given with it), or an
    architecture trained once and cached. A file naming code is refused unless ``trust_code``."""
    from .. import models

    arch, file = models.split_weights(spec) if spec else (None, None)
    if file is not None:
        model, meta = load_teacher_file(spec, data, trust_code)
        return model, meta.get("accuracy"), file
    arch = arch or DEFAULT_TEACHER
    topts = TrainOptions(data=opts.data, arch=arch, epochs=opts.teacher_epochs, seed=opts.seed, progress=opts.progress,
                         device=opts.device, amp=opts.amp)
    path = teacher_dir(opts.data, arch, opts.seed, opts.teacher_epochs) / "model.pt"
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
    if not Path(file).is_file():
        raise MissingFileError(f"teacher checkpoint not found: {file}",
                               "check the path, or train one with 'edgekd train'")
    if arch is not None:
        model = models.build_model(arch, data.num_classes, data.input_shape)
        ckpt = models.load_checkpoint(file)
        models.load_weights(model, ckpt["state_dict"], file)
        return model, ckpt["meta"]
    model, meta = models.load_model(file, expect_classes=data.num_classes, trust_code=trust_code)
    check_same_input(meta, data, file)
    return model, meta


def resolve_teachers(opts, data, log: Log, trust_code: bool = False):
    """One teacher, or several averaged into a training.schemes.Ensemble (``teacher_weights``, ``teacher_mix``)."""
    from ..training import accuracy
    from ..training.schemes import Ensemble

    found = [resolve_teacher(spec, data, opts, log, trust_code) for spec in teacher_specs(opts.teacher)]
    for model, acc, src in found:
        log(f"teacher {src}: test accuracy {acc if acc is not None else accuracy(model, data.test):.4f}")
    if len(found) == 1 and not opts.teacher_weights:
        model, acc, src = found[0]
        return model, acc if acc is not None else accuracy(model, data.test), src
    model = Ensemble([m for m, _, _ in found], opts.teacher_weights, opts.teacher_mix).eval()
    acc = accuracy(model, data.test)
    log(f"teacher ensemble of {len(found)} ({opts.teacher_mix} averaged): test accuracy {acc:.4f}")
    return model, acc, "+".join(src for _, _, src in found)


def teacher_specs(teacher) -> list[str | None]:
    if teacher is None or isinstance(teacher, str):
        return [teacher]
    return list(teacher) or [None]


def check_same_input(meta: dict, data, source: str) -> None:
    if tuple(meta["input_shape"]) != tuple(data.input_shape):
        raise IncompatibleError(f"teacher {source} takes inputs of shape {tuple(meta['input_shape'])} but the dataset's "
                                f"are {tuple(data.input_shape)}", "use a teacher trained on the same dataset")
