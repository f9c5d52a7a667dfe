"""Training schemes: who teaches whom, and in which order KD and QAT happen.

Every scheme takes a ``Run`` (data, options, the final quantization spec, a factory for fresh
objectives, a log) and returns an ``Outcome`` (the quantized student and its numbers). They all
reuse ``two_phase``: a first stage when the objective has one (fsp: that term alone, then dropped), float KD
for ``float_epochs`` (order ``float-first``), then QAT with the same objective (``joint``: from the first step).

- ``offline``     (default) a fixed, pre-trained teacher (one, or several averaged: ``Ensemble``).
- ``born-again``  Furlanello et al. 2018: generation k is taught by generation k-1's student.
- ``dml``         Zhang et al. 2018, deep mutual learning: float peers learn with the student (no teacher).
- ``assistant``   Mirzadeh et al. 2020, teacher assistants: teacher -> assistant(s) -> student,
                  every link trained with the run's method.
- ``progressive`` a bit schedule (e.g. 8 -> 4 -> 2): each stage starts from the previous
                  stage's weights and is distilled from it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.registry import Registry
from .ensemble import Ensemble, MemberLogits, for_distillation  # noqa: F401  (also reached through here)

SCHEMES: Registry = Registry("training scheme")
ORDERS = ("joint", "float-first")
PROGRESSIVE_BITS = (8, 4, 2)


@dataclass
class Run:
    """What a scheme needs. ``history`` collects per-epoch rows (with a ``phase``)."""

    opts: object  # config.options.DistillOptions
    data: object
    spec: object  # quant.QuantSpec of the final student
    new_objective: Callable[[], object]
    teacher: nn.Module | None
    log: Callable[[str], None]
    history: list = field(default_factory=list)
    cache_used: list = field(default_factory=list)
    objectives: list = field(default_factory=list)  # every objective trained (layers resolved)
    checkpoints: object = None  # checkpoint.RunCheckpoints: one phase file per fit, in order
    new_student: Callable[[], nn.Module] | None = None  # a fresh float student (None: build opts.student)
    pretrained: bool = False  # the student starts from trained weights: QAT warm-starts without a float phase
    auto_bits: object = None  # quant.autobits.AutoBits: --bits auto chooses the QAT spec after the float phase

    def phase(self, label: str):
        """The checkpoint of the next training phase (None without checkpointing)."""
        return self.checkpoints.phase(label) if self.checkpoints is not None else None

    @property
    def order(self) -> str:
        return resolve_order(self.opts.order, self.opts.float_epochs)

    @property
    def float_epochs(self) -> int:
        return self.opts.float_epochs if self.order == "float-first" else 0


@dataclass
class Outcome:
    student: nn.Module  # the quantized student
    float_accuracy: float | None
    val_accuracy: float
    seconds: float
    float_epochs: int
    qat_lr: float
    float_student: nn.Module | None = None  # the float student QAT started from (a float phase ran)


def resolve_order(order: str | None, float_epochs: int) -> str:
    """``None``: float-first when there are float epochs, else joint."""
    if order is None:
        return "float-first" if float_epochs else "joint"
    if order not in ORDERS:
        from ..core.registry import unknown
        raise unknown("order", order, ORDERS)
    return order


def _fit_cfg(run: Run, epochs: int, lr: float, seed: int, desc: str, quantized: bool = False):
    from .loop import FitConfig
    o = run.opts
    return FitConfig(epochs=epochs, lr=lr, batch_size=o.batch_size, seed=seed, flip=run.data.flip_augment,
                     progress=o.progress, desc=desc, log=run.log, device=o.device,
                     amp=o.amp and not quantized)


UNSTABLE_DROP = 0.10  # a validation accuracy this far below the phase's best is logged as a warning


def _epoch_logger(run: Run, label: str, phase: str):
    best: dict = {}

    def on_epoch(r: dict) -> None:
        run.history.append(dict(r, phase=phase))
        star = " *" if r.get("best") else ""
        run.log(f"{label} epoch {r['epoch']}: loss {r['loss']:.4f}, train acc {r['train_accuracy']:.4f}, "
                f"val acc {r['val_accuracy']:.4f} ({r['seconds']:.0f}s){star}")
        if best and r["val_accuracy"] < best["val"] - UNSTABLE_DROP:
            flag = "--qat-lr" if phase == "qat" else "--lr"
            run.log(f"warning: {label} val acc {r['val_accuracy']:.4f} is {100 * (best['val'] - r['val_accuracy']):.1f} "
                    f"points below its best ({best['val']:.4f}, epoch {best['epoch']}): training is unstable; the best "
                    f"epoch's weights are what the run keeps. A lower learning rate ({flag}) usually steadies it")
        if not best or r["val_accuracy"] > best["val"]:
            best.update(val=r["val_accuracy"], epoch=r["epoch"])
    return on_epoch


def prepare(run: Run, objective, student: nn.Module, teacher: nn.Module | None):
    """Resolve the objective's layers on this student/teacher pair; return the teacher as the loop runs it
    (for_distillation) and the teacher cache (shared by this student's phases), or False for none."""
    from ..kd.features import Probe
    from .batches import batches_for
    from .cache import teacher_cache

    train = run.data.train
    source = batches_for(train, run.opts.batch_size, run.data.flip_augment, run.opts.seed)
    if objective.needs_setup:
        objective.setup(Probe(student, teacher, source.head(8)))
    teacher = for_distillation(objective, teacher)
    if teacher is None or not run.opts.cache:
        if teacher is not None:
            run.log("teacher cache off: disabled by the cache option")
        return teacher, False
    cache = teacher_cache(teacher, source.source, run.data.flip_augment, objective.teacher_layers, run.log,
                          crop=getattr(train, "crops", False))
    run.cache_used.append(cache is not None)
    return teacher, cache if cache is not None else False


def first_stage(run: Run, objective, student: nn.Module, teacher, cache, epochs: int, desc: str) -> tuple:
    """Train the float student with the objective's first-stage terms alone (fsp: Yim et al.'s stage 1,
    RepDistiller's ``init``), for the terms' share of ``epochs`` (FlowOfSolution.stage_epochs), and keep
    its last state (not the best validation accuracy: the classifier is not trained in this stage).
    Returns (the objective to train after it, seconds)."""
    from . import loop as tr

    stage, rest = objective.stages()
    if stage is None:
        return objective, 0.0
    n = max(t.stage_epochs(epochs) for t in stage.members)
    cfg = _fit_cfg(run, n, run.opts.lr, run.opts.seed, f"{desc} first stage")
    checkpoint, last = run.phase(cfg.desc), {}
    log = _epoch_logger(run, cfg.desc, "first stage")

    def on_epoch(row):
        log(row)
        last["state"] = copy.deepcopy(student.state_dict())

    after = rest.name if rest.name != "none" else "CE"
    run.log(f"{cfg.desc}: {stage.name} alone for {n} epoch{'s' * (n != 1)}, then {after}")
    res = tr.fit(student, run.data, cfg, stage, teacher, on_epoch, cache=cache, checkpoint=checkpoint)
    state = last.get("state") or ((checkpoint.load() or {}).get("model") if checkpoint is not None else None)
    if state is not None:  # a finished stage restored by --resume: its file holds the last state
        student.load_state_dict(state)
    return rest, res.seconds


def two_phase(run: Run, student: nn.Module, teacher: nn.Module | None, spec, *, epochs: int | None = None,
              float_epochs: int | None = None, peers=None, tag: str = "", init_from: nn.Module | None = None) -> Outcome:
    """A first stage when the objective has one (fsp; not for a student that starts from a previous
    stage's weights), float KD (float-first order), then QAT with KD, all with one fresh objective."""
    from .. import quant
    from . import loop as tr
    from .evaluate import accuracy

    o = run.opts
    epochs = o.epochs if epochs is None else epochs
    float_epochs = run.float_epochs if float_epochs is None else float_epochs
    objective = run.new_objective()
    run.objectives.append(objective)
    teacher, cache = prepare(run, objective, student, teacher)
    float_acc, seconds = None, 0.0
    if init_from is None:
        objective, seconds = first_stage(run, objective, student, teacher, cache, float_epochs + epochs,
                                         f"float student{tag}")
    else:  # a later progressive stage: the weights went through the first stage already
        objective = objective.stages()[1]
    if float_epochs:
        cfg = _fit_cfg(run, float_epochs, o.lr, o.seed, f"float student{tag}")
        res = tr.fit(student, run.data, cfg, objective, teacher, _epoch_logger(run, f"float{tag}", "float"),
                     peers=peers, cache=cache, checkpoint=run.phase(cfg.desc))
        float_acc, seconds = accuracy(student, run.data.test), seconds + res.seconds
        run.log(f"float student{tag} test accuracy {float_acc:.4f}")
    elif run.pretrained and init_from is None:  # trained weights given: they are the float student
        float_acc = accuracy(student, run.data.test)
        run.log(f"float student{tag} (from its weights) test accuracy {float_acc:.4f}")
    if run.auto_bits is not None and init_from is None:  # --bits auto: measured on this float student
        spec = run.auto_bits.choose(run, student, spec)
        o, epochs = run.opts, run.opts.epochs
    qmodel = quant.quantize(student, spec)
    if init_from is not None:
        _copy_weights(init_from, qmodel)
    qat_lr = o.qat_lr or quant.mobile.default_qat_lr(o.lr, float_epochs or init_from is not None or run.pretrained, student, run.log)
    cfg = _fit_cfg(run, epochs, qat_lr, o.seed + 1, f"QAT {spec.label}{tag}", quantized=True)
    _qat_temperature(objective, o.qat_temperature, run.log)
    res = tr.fit(qmodel, run.data, cfg, objective, teacher, _epoch_logger(run, f"{spec.label}{tag}", "qat"),
                 peers=peers, cache=cache, checkpoint=run.phase(cfg.desc))
    return Outcome(qmodel, float_acc, res.best_val_accuracy, seconds + res.seconds, float_epochs, qat_lr,
                   student if float_epochs or (run.pretrained and init_from is None) else None)


def _qat_temperature(objective, temperature: float | None, log) -> None:
    """The QAT phase's KD temperature (config.options.qat_temperature) for hinton and kd terms, logged."""
    from ..kd.response import HintonKD, SoftTargets
    if temperature is None:
        return
    terms = [t for _, _, t in objective.terms if isinstance(t, (HintonKD, SoftTargets))]
    if not terms:
        log(f"warning: --qat-temperature {temperature:g} is ignored: the objective has no hinton or kd term")
    for term in (t for t in terms if t.temperature != temperature):
        log(f"QAT: KD temperature {temperature:g} (float phase {term.temperature:g}; --qat-temperature sets it)")
        term.temperature = temperature


def _copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Weights and biases of a previous stage (not its quantizer scales, which are re-learned)."""
    from ..quant import is_quantizer_param

    own = dst.state_dict()
    keep = {k: v for k, v in src.state_dict().items() if k in own and own[k].shape == v.shape
            and k.rsplit(".", 1)[-1] in ("weight", "bias") and "quant" not in k and not is_quantizer_param(k)}
    dst.load_state_dict(keep, strict=False)


def _build_student(run: Run, seed_offset: int = 0) -> nn.Module:
    from .. import models

    torch.manual_seed(run.opts.seed + seed_offset)
    if run.new_student is not None:  # weights files, modules from the Python API (pipeline.inputs)
        return run.new_student()
    return models.build_model(run.opts.student, run.data.num_classes, run.data.input_shape)


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@SCHEMES.register("offline")
def offline(run: Run) -> Outcome:
    """A fixed teacher (or ensemble) teaches the student."""
    return two_phase(run, _build_student(run), run.teacher, run.spec)


@SCHEMES.register("born-again")
def born_again(run: Run) -> Outcome:
    """``generations`` students in a row; each after the first is taught by the previous one
    (its quantized form, at the run's bits). Budget: generations x (float + QAT epochs)."""
    if not run.new_objective().needs_teacher:
        raise ConfigError("born-again needs a method that uses a teacher", "use e.g. --method hinton")
    teacher, seconds, out = run.teacher, 0.0, None
    for g in range(run.opts.generations):
        tag = f" gen {g}"
        out = two_phase(run, _build_student(run, seed_offset=g), teacher, run.spec, tag=tag)
        seconds += out.seconds
        run.log(f"generation {g}: val acc {out.val_accuracy:.4f}")
        if g < run.opts.generations - 1:
            teacher = _frozen(_clone(out.student))
    return replace(out, seconds=seconds)


@SCHEMES.register("dml")
def dml(run: Run) -> Outcome:
    """Deep mutual learning: ``peers`` float students (same architecture, other seeds) learn with
    the quantized student. The objective's teacher terms (KL, DKD, MSE) are computed once per peer and
    summed (a kd.Teachers "each" group); each peer learns CE + one KL per other network
    (training.loop.mutual_loss), as the authors' code sums them (YingZhangDUT/Deep-Mutual-Learning,
    train_models.py ``_tower_loss``)."""
    objective = run.new_objective()
    if objective.wants_layers:
        raise ConfigError("dml uses logit terms only (the peers have no fixed features)",
                          "use a response-based method (hinton, kd, dkd, mse)")
    peers = [_build_student(run, seed_offset=100 + k) for k in range(run.opts.peers)]
    return two_phase(run, _build_student(run), None, run.spec, peers=peers)


@SCHEMES.register("assistant")
def assistant(run: Run) -> Outcome:
    """Teacher -> assistant(s) -> student: each assistant (a float model, ``assistants`` in order)
    is distilled from the previous teacher for ``assistant_epochs`` with the run's method, then teaches
    the next (Mirzadeh et al. train every link of the chain with the same loss:
    imirzadeh/Teacher-Assistant-Knowledge-Distillation, train.py ``TrainManager.train``)."""
    from .. import models
    from . import loop as tr
    from .evaluate import accuracy

    o = run.opts
    teacher, seconds = run.teacher, 0.0
    epochs = o.assistant_epochs or max(1, o.float_epochs + o.epochs)
    for i, arch in enumerate(o.assistants):
        torch.manual_seed(o.seed + 1000 + i)  # each assistant's initial weights follow the run's seed
        model = models.build_model(arch, run.data.num_classes, run.data.input_shape)
        desc = f"assistant {arch}"
        objective = run.new_objective()
        loop_teacher, cache = prepare(run, objective, model, teacher)
        objective, stage_seconds = first_stage(run, objective, model, loop_teacher, cache, epochs, desc)
        cfg = _fit_cfg(run, epochs, o.lr, o.seed, desc)
        res = tr.fit(model, run.data, cfg, objective, loop_teacher, _epoch_logger(run, desc, "assistant"),
                     cache=cache, checkpoint=run.phase(cfg.desc))
        seconds += stage_seconds + res.seconds
        run.log(f"assistant {arch}: test accuracy {accuracy(model, run.data.test):.4f}")
        teacher = _frozen(model)
    out = two_phase(run, _build_student(run), teacher, run.spec)
    return replace(out, seconds=out.seconds + seconds)


def bit_schedule(opts, spec) -> list[int]:
    """The progressive stages: ``bit_schedule`` if given, else 8 -> 4 -> 2 down to the run's bits."""
    bits = list(opts.bit_schedule or [b for b in PROGRESSIVE_BITS if b > min(spec.weight_bits, spec.act_bits)])
    final = (spec.weight_bits, spec.act_bits)
    stages = [(b, b) for b in bits if (b, b) != final] + [final]
    if any(not 2 <= b <= 8 for st in stages for b in st):
        raise ConfigError(f"bit schedule must hold integers from 2 to 8, got {bits}")
    return stages


@SCHEMES.register("progressive")
def progressive(run: Run) -> Outcome:
    """Quantize in stages (e.g. W8A8 -> W4A4 -> W2A2). The QAT epochs are split across stages;
    each stage starts from the previous stage's weights and is distilled from it (the first
    stage from the teacher). The float phase (float-first order) runs once, before stage 1."""
    o = run.opts
    stages = bit_schedule(o, run.spec)
    per = [max(1, o.epochs // len(stages))] * len(stages)
    per[-1] = max(1, o.epochs - sum(per[:-1]))
    student, teacher, prev, seconds, out, float_acc = _build_student(run), run.teacher, None, 0.0, None, None
    float_student = None
    for i, ((w, a), epochs) in enumerate(zip(stages, per)):
        spec = replace(run.spec, weight_bits=w, act_bits=a)
        run.log(f"progressive stage {i + 1}/{len(stages)}: {spec.label}, {epochs} epochs")
        out = two_phase(run, student, teacher, spec, epochs=epochs, float_epochs=run.float_epochs if i == 0 else 0,
                        tag=f" stage {i + 1}", init_from=prev)
        float_acc, float_student = (out.float_accuracy, out.float_student) if i == 0 else (float_acc, float_student)
        seconds += out.seconds
        prev = out.student
        teacher = _frozen(_clone(out.student)) if run.new_objective().needs_teacher else None
    return replace(out, seconds=seconds, float_accuracy=float_acc, float_epochs=run.float_epochs,
                   float_student=float_student)


def _clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
