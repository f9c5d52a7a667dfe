"""Training schemes: who teaches whom, and in which order KD and QAT happen.

Every scheme takes a ``Run`` (data, options, the final quantization spec, a factory for fresh
objectives, a log) and returns an ``Outcome`` (the quantized student and its numbers). They all
reuse ``two_phase``: float KD for ``float_epochs`` when the order is ``float-first``, then
quantization-aware training with the same objective (``joint``: QAT with KD from the first step).

- ``offline``     (default) a fixed, pre-trained teacher (one, or several averaged: ``Ensemble``).
- ``born-again``  Furlanello et al. 2018: generation k is taught by generation k-1's student.
- ``dml``         Zhang et al. 2018, deep mutual learning: float peers trained with the student,
                  each learning from the others (CE + KL at T=1); no pre-trained teacher.
- ``assistant``   Mirzadeh et al. 2020, teacher assistants: teacher -> assistant(s) -> student.
- ``progressive`` a bit schedule (e.g. 8 -> 4 -> 2): each stage starts from the previous
                  stage's weights and is distilled from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.registry import Registry

SCHEMES: Registry = Registry("training scheme")
ORDERS = ("joint", "float-first")
PROGRESSIVE_BITS = (8, 4, 2)


class Ensemble(nn.Module):
    """Several teachers as one: a weighted average of their soft targets.

    ``mix="probs"`` (default) returns log(sum_i w_i softmax(z_i)), whose softmax is the averaged
    distribution; ``mix="logits"`` returns sum_i w_i z_i. Features come from the first teacher.
    """

    def __init__(self, teachers: list[nn.Module], weights: list[float] | None = None, mix: str = "probs"):
        super().__init__()
        weights = list(weights or [1.0] * len(teachers))
        if len(weights) != len(teachers) or min(weights) < 0 or sum(weights) <= 0:
            raise ConfigError(f"{len(teachers)} teachers need as many non-negative weights, got {weights}",
                              "pass one --teacher-weight per --teacher")
        if mix not in ("probs", "logits"):
            raise ConfigError(f"teacher mix must be 'probs' or 'logits', got {mix!r}")
        self.members = nn.ModuleList(teachers)
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32) / sum(weights))
        self.mix = mix

    @property
    def feature_source(self) -> nn.Module:
        return self.members[0]

    def forward(self, x):
        outs = torch.stack([m(x) for m in self.members])
        w = self.weights.view(-1, 1, 1)
        if self.mix == "logits":
            return (w * outs).sum(0)
        return torch.logsumexp(F.log_softmax(outs, dim=2) + w.log(), dim=0)


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


def _epoch_logger(run: Run, label: str, phase: str):
    def on_epoch(r: dict) -> None:
        run.history.append(dict(r, phase=phase))
        star = " *" if r.get("best") else ""
        run.log(f"{label} epoch {r['epoch']}: loss {r['loss']:.4f}, train acc {r['train_accuracy']:.4f}, "
                f"val acc {r['val_accuracy']:.4f} ({r['seconds']:.0f}s){star}")
    return on_epoch


def prepare(run: Run, objective, student: nn.Module, teacher: nn.Module | None):
    """Resolve the objective's layers on this student/teacher pair and build the teacher cache
    (shared by the float and QAT phases: same teacher, same training inputs)."""
    from ..kd.features import Probe
    from .cache import teacher_cache
    from .evaluate import as_tensors

    x, _ = as_tensors(run.data.train)
    if objective.needs_setup:
        objective.setup(Probe(student, teacher, x[:8]))
    if teacher is None or not run.opts.cache:
        if teacher is not None:
            run.log("teacher cache off: disabled by the cache option")
        return False
    cache = teacher_cache(teacher, x, run.data.flip_augment, objective.teacher_layers, run.log)
    run.cache_used.append(cache is not None)
    return cache if cache is not None else False


def two_phase(run: Run, student: nn.Module, teacher: nn.Module | None, spec, *, epochs: int | None = None,
              float_epochs: int | None = None, peers=None, tag: str = "", init_from: nn.Module | None = None) -> Outcome:
    """Float KD (float-first order) then QAT with KD, both with a fresh objective from the run."""
    from .. import quant
    from . import loop as tr
    from .evaluate import accuracy

    o = run.opts
    epochs = o.epochs if epochs is None else epochs
    float_epochs = run.float_epochs if float_epochs is None else float_epochs
    objective = run.new_objective()
    run.objectives.append(objective)
    cache = prepare(run, objective, student, teacher)
    float_acc, seconds = None, 0.0
    if float_epochs:
        cfg = _fit_cfg(run, float_epochs, o.lr, o.seed, f"float student{tag}")
        res = tr.fit(student, run.data, cfg, objective, teacher, _epoch_logger(run, f"float{tag}", "float"),
                     peers=peers, cache=cache, checkpoint=run.phase(cfg.desc))
        float_acc, seconds = accuracy(student, run.data.test), res.seconds
        run.log(f"float student{tag} test accuracy {float_acc:.4f}")
    qmodel = quant.quantize(student, spec)
    if init_from is not None:
        _copy_weights(init_from, qmodel)
    qat_lr = o.qat_lr or (o.lr / 4 if float_epochs or init_from is not None else o.lr)
    cfg = _fit_cfg(run, epochs, qat_lr, o.seed + 1, f"QAT {spec.label}{tag}", quantized=True)
    res = tr.fit(qmodel, run.data, cfg, objective, teacher, _epoch_logger(run, f"{spec.label}{tag}", "qat"),
                 peers=peers, cache=cache, checkpoint=run.phase(cfg.desc))
    return Outcome(qmodel, float_acc, res.best_val_accuracy, seconds + res.seconds, float_epochs, qat_lr)


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
    the quantized student; the objective's teacher logits are the peers' mean output."""
    objective = run.new_objective()
    if objective.wants_layers:
        raise ConfigError("dml uses logit terms only (the peers have no fixed features)",
                          "use a response-based method (hinton, kd, dkd, mse)")
    peers = [_build_student(run, seed_offset=100 + k) for k in range(run.opts.peers)]
    return two_phase(run, _build_student(run), None, run.spec, peers=peers)


@SCHEMES.register("assistant")
def assistant(run: Run) -> Outcome:
    """Teacher -> assistant(s) -> student: each assistant (a float model, ``assistants`` in order)
    is distilled from the previous teacher for ``assistant_epochs``, then teaches the next."""
    from .. import models
    from ..kd import Objective
    from . import loop as tr
    from .evaluate import accuracy

    o = run.opts
    teacher, seconds = run.teacher, 0.0
    epochs = o.assistant_epochs or max(1, o.float_epochs + o.epochs)
    for arch in o.assistants:
        model = models.build_model(arch, run.data.num_classes, run.data.input_shape)
        objective = Objective.single("hinton", temperature=o.temperature, alpha=o.alpha)
        cache = prepare(run, objective, model, teacher)
        cfg = _fit_cfg(run, epochs, o.lr, o.seed, f"assistant {arch}")
        res = tr.fit(model, run.data, cfg, objective, teacher, _epoch_logger(run, f"assistant {arch}", "assistant"),
                     cache=cache, checkpoint=run.phase(cfg.desc))
        seconds += res.seconds
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
    for i, ((w, a), epochs) in enumerate(zip(stages, per)):
        spec = replace(run.spec, weight_bits=w, act_bits=a)
        run.log(f"progressive stage {i + 1}/{len(stages)}: {spec.label}, {epochs} epochs")
        out = two_phase(run, student, teacher, spec, epochs=epochs, float_epochs=run.float_epochs if i == 0 else 0,
                        tag=f" stage {i + 1}", init_from=prev)
        float_acc = out.float_accuracy if i == 0 else float_acc
        seconds += out.seconds
        prev = out.student
        teacher = _frozen(_clone(out.student)) if run.new_objective().needs_teacher else None
    return replace(out, seconds=seconds, float_accuracy=float_acc, float_epochs=run.float_epochs)


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
