"""Distill: train a quantized student by knowledge distillation, and write its run directory.

The run directory (default ``runs/<name>/``) is what the next stage, deploy, takes: ``student.pt``
(weights and everything needed to rebuild the quantized model), ``recipe.json`` (the resolved
options), ``metrics.json`` (teacher and student accuracies, bits, method, per-epoch history) and
``log.txt``. ``load_student`` rebuilds the model from it.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..config import options as op
from ..config.options import DistillOptions
from ..core.errors import CheckpointError, EdgekdError, IncompatibleError, MissingFileError
from ..core.fsutil import RUN_FORMAT, RUNS_DIR, atomic_dir, check_output, check_partial, latest, write_json, write_text
from .common import (Log, check_device, data_inputs, data_options, dataset_name, join_group, load_data, model_meta, options_dict,
                     quiet, slug)
from .inputs import Objects, as_objects, export_model, make_student
from .layers import list_layers  # noqa: F401  (distill --list-layers)
from .teachers import resolve_teachers, teacher_specs


def distill(opts: DistillOptions, out: Path | None = None, log: Log = quiet, resume: bool = False,
            overwrite: bool = False, trust_code: bool = False, tensorboard: bool = False, *,
            teacher=None, student=None, data=None, student_trained: bool = False) -> dict:
    """Quantized distillation: KD from the teacher while training the student with Brevitas QAT.

    The scheme (training.schemes) decides who teaches whom; the objective (kd, from ``method`` or a
    recipe) what is matched; ``order`` whether float KD precedes QAT. Training state is checkpointed
    in ``OUT.partial`` after every epoch and on SIGINT/SIGTERM; ``resume`` continues from it. Under
    torchrun every rank trains (DDP) and rank 0 writes. Returns the run's metrics (and ``run_dir``).

    ``out`` obeys the output-path rule (core.fsutil.check_output; ``overwrite``) and is locked from
    before training until the run is in place. Model specs read from files (the recipe, teacher
    checkpoints) may name code (``module:callable``) only with ``trust_code``.

    The run dir gets ``metrics.csv`` and ``curves.png`` (training.curves); ``tensorboard`` also
    writes TensorBoard events as epochs finish (training.curves.tensorboard_dir).

    The Python API may pass objects instead of specs: ``teacher`` (an nn.Module, or a list of them),
    ``student`` (an nn.Module that traces with torch.fx; the run records it as python-api) and
    ``data`` (an api.TorchData: torch datasets and their class names). ``student_trained``: the
    student module holds trained float weights, as a student weights file does (QAT warm-starts from
    it without a float phase, and it is kept as the run's float.pt, explain's float reference).
    """
    objects = as_objects(data, student, teacher, student_trained)
    opts = objects.apply(opts)
    joined, loud = join_group(opts)
    try:
        with ExitStack() as held:
            asks = _Asks(overwrite, trust_code, held, objects)
            return _distill(opts, out, log if loud else quiet, resume, asks, tensorboard)
    finally:
        if joined:
            from ..training import distributed as dd

            dd.shutdown()


@dataclass
class _Asks:
    """What the caller allows: replacing a foreign output, code named in files; the locks held."""

    overwrite: bool = False
    trust_code: bool = False
    held: ExitStack | None = None
    objects: Objects = field(default_factory=Objects)  # the Python API's modules and data


@dataclass
class _Plan:
    """Everything decided before training: checked options, target, QuantSpec, data, names."""

    opts: DistillOptions
    order: str
    target: object
    spec: object
    new_objective: object
    data: object
    float_model: object
    method: str
    out: Path
    student: object = None  # inputs.Student: how students are made, what the run records
    auto: object = None  # quant.autobits.AutoBits of --bits auto (the spec is then chosen after the float phase)


def _plan(opts: DistillOptions, out: Path | None, log: Log, asks: _Asks, resume: bool = False) -> _Plan:
    """Check everything a typo or a bad combination can break, before any teacher trains: options,
    recipe, target and bits, the objective, the output path, the data, and that the student traces."""
    from .. import models, quant
    from ..config import budget as auto_budget
    from ..quant import autobits, layerbits
    from ..training import schemes
    from ..training.checkpoint import partial_dir

    opts = with_recipe(opts, asks.trust_code)
    check_device(opts.device)  # a recipe's device too (the command line's was checked before joining a group)
    op.validate(opts)
    budget = auto_budget.request(opts)  # --bits auto and its budget: each mistake one line, before anything
    order = schemes.resolve_order(opts.order, opts.float_epochs)
    schemes.SCHEMES.get(opts.scheme)
    target, spec = quant_spec(opts, log)
    new_objective = objective_factory(opts)
    method = opts.method if not opts.loss else new_objective().name
    name = slug(dataset_name(opts.data), models.split_weights(opts.student)[0] or Path(opts.student).stem,
                f"autoa{spec.act_bits}" if budget else spec.label.lower(),
                *(["mixed"] if spec.layer_bits else []), method,
                *([opts.scheme] if opts.scheme != "offline" else []))
    out = Path(out) if out else RUNS_DIR / name
    teacher_files = [models.split_weights(t)[1] for t in teacher_specs(opts.teacher) if t]
    student_file = models.split_weights(opts.student)[1] if asks.objects.student is None else None
    check_output(out, "run", [*data_inputs(opts.data), *teacher_files, student_file, opts.config], asks.overwrite)
    check_partial(partial_dir(out), asks.overwrite, resume)
    data = _limit(load_data(opts.data, opts.seed, data_options(opts), asks.objects.data), opts.train_limit)
    if opts.flip is not None:
        data.flip_augment = opts.flip
    student = make_student(opts.student, data, asks.objects.student, log, asks.trust_code,
                           asks.objects.student_trained)
    quant.trace(student.model)  # an untraceable student fails in seconds, not after the teacher
    layerbits.check(student.model, spec)  # a --layer-bits pattern naming no layer too
    auto = autobits.from_options(opts, budget, student, spec, target, order, asks.objects.student is not None) \
        if budget else None  # a budget the narrowest widths cannot meet: stops here
    low = min(autobits.widths(target)) if auto else spec.weight_bits  # (auto: until the bits are chosen)
    opts = replace(opts, order=order, epochs=op.qat_epochs(opts.epochs, low, spec.act_bits),
                   qat_temperature=op.qat_temperature(opts, low, spec.act_bits))
    return _Plan(opts, order, target, spec, new_objective, data, student.model, method, out, student, auto)


def _distill(opts: DistillOptions, out: Path | None, log: Log, resume: bool, asks: _Asks,
             tensorboard: bool = False) -> dict:
    from ..training import accuracy, distributed as dd, schemes
    from ..training.checkpoint import RunCheckpoints, partial_dir
    from ..training.curves import History

    from ..training import set_threads

    set_threads()
    plan = _plan(opts, out, log, asks, resume)
    opts, ckpt_opts = plan.opts, options_dict(plan.opts)
    RunCheckpoints.resumable(partial_dir(plan.out), ckpt_opts, resume)  # a --resume that cannot continue fails now
    if dd.is_main() and asks.held is not None:  # until the new run is in place: no export of a half-written run
        from ..core.locks import write_lock

        asks.held.enter_context(write_lock(plan.out))
    board = _board(plan.out, tensorboard, log, asks.held)
    objective = plan.new_objective()
    lines = list(plan.student.notes)  # log.txt: what was logged while planning, then the rest
    logf = lambda s: (lines.append(s), log(s))  # noqa: E731
    for line in plan.auto.notes() if plan.auto else []:
        logf(line)
    teacher, teacher_acc, teacher_src = None, None, None
    if (objective.needs_teacher and opts.scheme != "dml") or opts.scheme == "assistant":
        teacher, teacher_acc, teacher_src = resolve_teachers(opts, plan.data, logf, asks.trust_code,
                                                             asks.objects.teachers)
    checkpoints = RunCheckpoints(partial_dir(plan.out), ckpt_opts, resume, logf)
    logf(f"method {plan.method} ({', '.join(f'{w:g} x {n}' for n, w, _ in objective.terms)}), scheme {opts.scheme}, "
         f"order {plan.order}" + (f", {dd.world()} processes (global batch {opts.batch_size})" if dd.world() > 1 else ""))
    run = schemes.Run(opts=opts, data=plan.data, spec=plan.spec, new_objective=plan.new_objective,
                      teacher=teacher, log=logf, checkpoints=checkpoints,
                      history=History(board.epoch if board is not None else None), new_student=plan.student.factory,
                      pretrained=plan.student.trained, auto_bits=plan.auto)
    result = schemes.SCHEMES.get(opts.scheme)(run)
    if plan.auto is not None:  # the bits and QAT epochs chosen after the float phase
        spec = result.student.edgekd_spec
        plan = replace(plan, opts=replace(run.opts, weight_bits=spec.weight_bits), spec=spec)
    student_acc = accuracy(result.student, plan.data.test, sharded=True)
    logf(f"{plan.spec.label} student test accuracy (fake-quant, PyTorch) {student_acc:.4f}")
    if plan.data.bad_images():
        logf(f"skipped {len(plan.data.bad_images())} unreadable images (--skip-bad-images), e.g. "
             f"{plan.data.bad_images()[0]}")
    metrics = _metrics(plan, run, result, objective, teacher_acc, teacher_src, student_acc)
    if dd.is_main():
        _write_run(plan, result, metrics, lines, logf)
    checkpoints.finish()
    return metrics | {"run_dir": str(plan.out)}


def _metrics(plan: _Plan, run, result, objective, teacher_acc, teacher_src, student_acc) -> dict:
    from .. import models
    from ..training import distributed as dd

    opts, spec = plan.opts, plan.spec
    return {"teacher_accuracy": teacher_acc, "student_accuracy": student_acc,
            "student_float_accuracy": result.float_accuracy, "val_accuracy": result.val_accuracy,
            "weight_bits": spec.weight_bits, "act_bits": spec.act_bits, "layer_bits": spec.layer_rules_text,
            "method": plan.method, "epochs": opts.epochs, "float_epochs": result.float_epochs, "dataset": opts.data,
            "student": opts.student, "student_params": models.count_params(plan.float_model),
            "target": plan.target.name, "scheme": opts.scheme, "order": plan.order,
            "loss": (run.objectives or [objective])[-1].describe(), "teacher": teacher_src,
            "teacher_cache": bool(run.cache_used) and all(run.cache_used), "processes": dd.world(),
            "student_arch": plan.student.arch, "student_weights": plan.student.weights,
            "new_head": plan.student.new_head, "bad_images": len(plan.data.bad_images()),
            "seconds": result.seconds, "history": run.history}


def _board(out: Path, tensorboard: bool, log: Log, held: ExitStack | None):
    """The TensorBoard writer of ``--tensorboard`` (rank 0), closed when the run ends; made
    before any training, so that a missing extra fails in a second."""
    from ..training import distributed as dd
    from ..training.curves import TensorBoard, tensorboard_dir

    if not tensorboard or not dd.is_main():
        return None
    board = TensorBoard(tensorboard_dir(out), default_phase="distill")
    if held is not None:
        held.callback(board.close)
    log(f"tensorboard: events in {board.logdir} (tensorboard --logdir {board.logdir.parent})")
    return board


def _write_run(plan: _Plan, result, metrics: dict, lines: list[str], log: Log = quiet) -> None:
    from .. import models
    from ..quant import layerbits
    from ..training.curves import write_curves

    opts, spec = plan.opts, plan.spec
    meta = model_meta(plan.student.arch, plan.data, opts.data, opts.seed) | {
        "quant": spec.to_dict(), "target": plan.target.name, "init_weights": plan.student.weights}
    recipe = asdict(opts) | {"float_epochs": result.float_epochs, "qat_lr": result.qat_lr,
                             "target": plan.target.name, "order": plan.order, "loss": metrics["loss"],
                             **layerbits.record(result.student, log),
                             **({"auto_bits": plan.auto.record} if plan.auto is not None else {})}
    recipe.pop("progress")
    with atomic_dir(plan.out) as tmp:
        models.save_checkpoint(tmp / "student.pt", result.student.state_dict(), meta)
        if result.float_student is not None:  # what `export --float` and `quantize` (PTQ) start from
            float_meta = {k: v for k, v in meta.items() if k not in ("quant", "target")}
            models.save_checkpoint(tmp / "float.pt", result.float_student.state_dict(),
                                   float_meta | {"accuracy": result.float_accuracy})
        write_json(tmp / "recipe.json", recipe)
        write_json(tmp / "metrics.json", {"format": RUN_FORMAT} | metrics)
        write_curves(tmp, metrics["history"], log, "distill", title=f"{plan.out.name}: {plan.method}, {spec.label}")
        write_text(tmp / "log.txt", "\n".join(lines) + "\n")


# --- the parts of a plan ---------------------------------------------------------------------------

def parse_recipe(text: str, source: str = "recipe") -> tuple[dict, list[dict]]:
    """A recipe's (options, loss terms), every option and term checked (config.recipe, kd)."""
    from ..config import recipe
    from ..kd import check_terms

    options, terms = recipe.parse(text, source)
    check_terms(terms, source)
    return options, terms


def with_recipe(opts: DistillOptions, trust_code: bool = False) -> DistillOptions:
    """Options completed from ``opts.config``: the file fills what the caller left at its default.
    Its model specs (student, teacher, assistants) may name code only with ``trust_code``."""
    from ..config import recipe
    from ..models import check_trusted, split_weights

    if not opts.config:
        return opts
    options, terms = parse_recipe(recipe.read(opts.config), str(opts.config))
    defaults = DistillOptions()
    explicit = {f.name for f in fields(opts) if getattr(opts, f.name) != getattr(defaults, f.name)}
    for key in ("student", "teacher", "assistants"):
        values = options.get(key) if key not in explicit else None
        for value in values if isinstance(values, list) else [values]:
            arch = split_weights(value)[0] if isinstance(value, str) else None
            check_trusted(arch, f"{opts.config}: {key}", f"--{key.removesuffix('s')} {arch}", trust_code)
    cli_rules = opts.layer_bits if "layer_bits" in explicit else None
    opts = recipe.apply(opts, options, explicit)
    if cli_rules and options.get("layer_bits"):  # the recipe's rules, then the command line's (later wins)
        opts = replace(opts, layer_bits=[*options["layer_bits"], *cli_rules])
    return replace(opts, loss=terms) if opts.loss is None and terms else opts


def _limit(data, n: int | None):
    """The dataset with only its first ``n`` training samples (the split is already shuffled)."""
    if n:
        data.train = data.train.subset(range(min(n, len(data.train))))
    return data


def objective_factory(opts: DistillOptions):
    """A function building a fresh kd.Objective (every student gets its own adapters)."""
    from ..kd import Objective

    if opts.loss:
        factory = lambda: Objective.from_specs(opts.loss)  # noqa: E731
    else:
        params = dict(opts.params)
        if opts.method == "hinton":
            params = {"temperature": opts.temperature, "alpha": opts.alpha} | params
        factory = lambda: Objective.single(opts.method, **params)  # noqa: E731
    factory()  # fail early on a bad method or parameter
    return factory


def quant_spec(opts: DistillOptions, log: Log):
    """The target and the QuantSpec of the student: the requested bits with the target's conventions,
    checked by the catalog's pre-flight (errors stop the run before any training)."""
    from .. import catalog, quant
    from ..quant import layerbits
    target = catalog.load_target(opts.target)
    rules = layerbits.rules_from(opts.layer_bits)
    spec = quant.spec_for_target(target, opts.weight_bits, opts.act_bits, opts.first_last_bits, layer_bits=rules)
    if (spec.weight_bits, spec.first_last_bits, spec.layer_bits) != (opts.weight_bits, opts.first_last_bits, rules):
        log(f"warning: target {target.name} uses reduce_range: weights are trained with at most 7 bits "
            f"(W{spec.weight_bits}, first/last layers {spec.first_last_weight_bits}) because ONNX "
            "Runtime's x86 int8 kernels saturate with 8-bit weights on CPUs without VNNI; on ARM use --target rpi")
    findings = catalog.preflight(target, spec.weight_bits, spec.act_bits, layer_bits=spec.layer_bits)
    for finding in findings:
        if finding["level"] != "error":
            log(f"{finding['level']}: {finding['message']}")
    errors = [f for f in findings if f["level"] == "error"]
    if errors:  # the exported model would not run on the target: stop before any training
        raise IncompatibleError(f"{spec.label} cannot be deployed to {target.name}: "
                                + "; ".join(f["message"] for f in errors),
                                "; ".join(f["suggestion"] for f in errors if f["suggestion"]) or None)
    return target, spec


# --- reading a run back -----------------------------------------------------------------------------

STUDENT_META = ("arch", "num_classes", "input_shape", "dataset", "seed", "classes", "normalization", "quant")


def load_student(run_dir: Path, student=None, trust_code: bool = False):
    """Rebuild the quantized student of a run directory, with its trained weights and scales.

    ``student``: the architecture named again on the command line (trusted; an ``=WEIGHTS`` part is
    ignored), or the nn.Module the Python API distilled (a run recorded as python-api); otherwise the
    one the checkpoint names, which may be code (``module:callable``) only with ``trust_code``."""
    from .. import models, quant

    ckpt_path = Path(run_dir) / "student.pt"
    ckpt = models.load_checkpoint(ckpt_path)
    meta = ckpt["meta"]
    if "quant" not in meta:
        raise EdgekdError(f"{ckpt_path} is not a distilled student (no quantization spec)",
                          "pass a run directory written by 'edgekd distill'")
    models.check_meta(meta, ckpt_path, STUDENT_META)
    try:
        # a run written before QuantSpec.first_last_by found its first/last layers by shape
        qspec = quant.QuantSpec(**{"first_last_by": "shape", **meta["quant"]})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt_path} is damaged: metadata 'quant' is not a quantization spec ({e})",
                              "use the file edgekd wrote") from None
    float_model = export_model(student, meta, ckpt_path, run_dir, trust_code)
    qmodel = quant.quantize(float_model, qspec)
    quant.materialize(qmodel, meta["input_shape"])
    models.load_weights(qmodel, ckpt["state_dict"], str(ckpt_path))
    qmodel.eval()
    return qmodel, meta


def load_float(run_dir: Path, student: str | None = None, trust_code: bool = False):
    """The float student of a run (``float.pt``: the model its QAT started from), in eval mode."""
    from .. import models

    path = Path(run_dir) / "float.pt"
    if not path.is_file():
        raise MissingFileError(f"{run_dir} holds no float student (float.pt)",
                               "distill with a float phase (--float-epochs > 0, the default) to keep one")
    ckpt = models.load_checkpoint(path)
    meta = ckpt["meta"]
    models.check_meta(meta, path, STUDENT_META[:-1])
    model = export_model(student, meta, path, run_dir, trust_code)  # an nn.Module from the Python API too
    models.load_weights(model, ckpt["state_dict"], str(path))
    return model.eval(), meta


def find_run(run_dir: str | Path | None) -> Path:
    if run_dir is None:
        run_dir = latest(RUNS_DIR, "student.pt")
        if run_dir is None:
            raise MissingFileError("no distilled run found under runs/", "run 'edgekd distill' first, or pass RUN_DIR")
    run_dir = Path(run_dir)
    missing = [name for name in ("student.pt", "metrics.json") if not (run_dir / name).is_file()]
    if missing:
        raise MissingFileError(f"{run_dir} is not a run directory (no {' or '.join(missing)})",
                               "pass a directory written by 'edgekd distill'")
    return run_dir


def read_metrics(run_dir: Path) -> dict:
    """A run's metrics.json, or one error naming the file (not JSON, not an object)."""
    from ..core import jsonfile
    path = Path(run_dir) / "metrics.json"
    try:
        metrics = jsonfile.read(path)  # bounded size and nesting
    except (ValueError, UnicodeDecodeError) as e:
        raise EdgekdError(f"{path} is not valid JSON ({e})", "use the run directory edgekd wrote") from None
    except OSError as e:
        raise MissingFileError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(metrics, dict):
        raise EdgekdError(f"{path} is not a JSON object", "use the run directory edgekd wrote")
    return metrics
