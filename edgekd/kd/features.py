"""Intermediate features for feature- and relation-based distillation: hooks, probes, adapters.

Layers are named by module path (``model.named_modules()``), e.g. ``5`` or ``3.body.0``; the name
``logits`` is the network's output. Forward hooks are put only on the modules a term names.

In a quantized student (a Brevitas fx GraphModule) batch norms are merged away, ReLUs become
QuantReLUs under the same path, and containers (e.g. a residual block) are flattened: only leaf
modules still run. So automatic choices and ``layer_table`` use leaf modules that run in both
the float and the quantized student. A hooked output that is a Brevitas QuantTensor is replaced
by its float ``.value``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.errors import ConfigError, UnknownNameError
from ..core.registry import suggest

LOGITS = "logits"
_SKIP = ("BatchNorm", "Dropout", "Identity", "QuantIdentity")


def _value(out):
    return getattr(out, "value", out)


def _device(model: nn.Module) -> torch.device:
    """Where ``model`` runs: its first parameter's (or buffer's) device, the CPU for neither."""
    first = next(iter(model.parameters()), None)
    first = first if first is not None else next(iter(model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _source(model: nn.Module) -> nn.Module:
    """The module whose layers are hooked (a teacher ensemble exposes its first member)."""
    return getattr(model, "feature_source", model)


def _no_such_layer(role: str, name: str, valid: list[str]) -> UnknownNameError:
    return UnknownNameError(f"the {role} has no layer {name!r}{suggest(name, valid)}",
                            f"valid layers: {', '.join(valid[:40])}{' ...' if len(valid) > 40 else ''} "
                            "(list them all with 'edgekd distill --list-layers')")


@dataclass
class Feats:
    """Captured outputs of one batch: ``student[name]`` and ``teacher[name]`` (float tensors)."""

    student: dict = field(default_factory=dict)
    teacher: dict = field(default_factory=dict)


class FeatureHooks:
    """Forward hooks on the named modules of ``model``; ``take()`` returns and clears the outputs."""

    def __init__(self, model: nn.Module | None, names, role: str = "student"):
        self.names = [n for n in names if n != LOGITS] if model is not None else []
        self.role, self.out, self.handles = role, {}, []
        if not self.names:
            return
        source = _source(model)
        modules = dict(source.named_modules())
        for name in self.names:
            if name not in modules:
                raise _no_such_layer(role, name, [n for n in modules if n])
            self.handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.out[name] = _value(output)
        return hook

    def take(self) -> dict:
        out, self.out = self.out, {}
        missing = [n for n in self.names if n not in out]
        if missing:
            raise ConfigError(f"layer {missing[0]!r} of the {self.role} did not run in its forward pass",
                              "in a quantized student containers are flattened and batch norms merged: name a leaf "
                              "module that runs (see 'edgekd distill --list-layers')")
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _layers(source: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules, where a Brevitas layer (QuantConv2d, QuantReLU...) counts as a leaf."""
    out, inside = [], []
    for name, m in source.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        quant = type(m).__module__.startswith("brevitas")
        if quant:
            inside.append(name)
        if quant or not list(m.children()):
            out.append((name, m))
    return out


@torch.no_grad()
def run_order(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str, tuple]]:
    """(name, type, output shape without batch) of every leaf module that runs, in completion order.
    ``x`` (e.g. a CPU batch) is moved to the model's device (a teacher on a GPU)."""
    import copy

    model = copy.deepcopy(model)  # an eval pass must not touch a fresh quantizer's statistics
    x = x.to(_device(model))
    source = _source(model)
    rows, handles = [], []
    for name, m in _layers(source):
        handles.append(m.register_forward_hook(
            lambda mod, i, o, name=name: rows.append((name, type(mod).__name__, tuple(_value(o).shape[1:])))
            if isinstance(_value(o), torch.Tensor) else None))
    was_training = model.training
    model.eval()
    try:
        out = model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    seen, unique = set(), []
    for row in rows:  # a module called twice keeps its last position
        if row[0] in seen:
            unique = [r for r in unique if r[0] != row[0]]
        seen.add(row[0])
        unique.append(row)
    return unique + [(LOGITS, "output", tuple(_value(out).shape[1:]))]


def _candidates(order) -> list[tuple[str, tuple]]:
    """Layers an automatic rule may pick: not the classifier (the last module) nor the logits, and
    no batch norm / dropout / identity (they vanish or change in a quantized student)."""
    return [(n, s) for n, kind, s in order[:-2] if not kind.startswith(_SKIP)]


def stages(order) -> dict[tuple, str]:
    """Resolution -> the last 4-D output at it (a stage's output), in network order."""
    last: dict[tuple, str] = {}
    for name, shape in _candidates(order):
        if len(shape) == 3 and shape[1] * shape[2] > 1:  # a global pool's 1x1 output is no stage
            last.pop(shape[1:], None)
            last[shape[1:]] = name
    return last


def embedding(order) -> str:
    """The last flat (2-D) output before the classifier, or ``logits``."""
    flat = [n for n, s in _candidates(order) if len(s) == 1]
    return flat[-1] if flat else LOGITS


class Probe:
    """Shapes and run order of the student's and teacher's layers on a sample batch; resolves the
    layers a feature term uses (named ones are checked, missing ones chosen by a rule)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, x: torch.Tensor):
        self.student_order = run_order(student, x)
        self.teacher_order = run_order(teacher, x) if teacher is not None else None

    def student_shape(self, name: str) -> tuple:
        return self._shape(self.student_order, name, "student")

    def teacher_shape(self, name: str) -> tuple:
        return self._shape(self.teacher_order, name, "teacher")

    def _shape(self, order, name: str, role: str) -> tuple:
        if order is None:
            raise ConfigError(f"a feature term needs a teacher for layer {name!r}")
        shapes = {n: s for n, _, s in order}
        if name not in shapes:
            raise _no_such_layer(role, name, list(shapes))
        return shapes[name]

    def pairs(self, student: list[str] | None, teacher: list[str] | None, auto: str) -> tuple[list[str], list[str]]:
        if self.teacher_order is None:
            raise ConfigError("feature and relation terms need a teacher", "add --teacher, or use a logit method")
        s_auto, t_auto = self._auto(auto)
        student = list(student) if student else s_auto
        teacher = list(teacher) if teacher else t_auto
        if len(student) != len(teacher) or not student:
            raise ConfigError(f"a feature term pairs student and teacher layers one to one; got {len(student)} "
                              f"student and {len(teacher)} teacher layers",
                              "name as many layers in 'student' as in 'teacher'")
        for s, t in zip(student, teacher):
            self.student_shape(s), self.teacher_shape(t)
        return student, teacher

    def _auto(self, rule: str) -> tuple[list[str], list[str]]:
        if rule == "embedding":
            return [embedding(self.student_order)], [embedding(self.teacher_order)]
        s, t = stages(self.student_order), stages(self.teacher_order)
        shared = [r for r in s if r in t]
        if not shared:
            raise ConfigError("the student and teacher share no feature-map resolution",
                              "name the layers to pair in the recipe ('student' and 'teacher')")
        if rule == "last":
            shared = shared[-1:]
        elif rule == "middle":  # stage 2 of 3 or 4: the hint layer of RepDistiller and mdistiller
            shared = [shared[(len(shared) - 1) // 2]]
        return [s[r] for r in shared], [t[r] for r in shared]


def adapter(student_shape: tuple, teacher_shape: tuple, spatial: bool = True) -> nn.Module:
    """A learned map from student features to the teacher's channels (fsp): 1x1 conv for maps, linear
    for vectors, identity when the channels already agree (sizes are pooled by the terms)."""
    if len(student_shape) != len(teacher_shape):
        raise ConfigError(f"cannot pair a student feature of shape {student_shape} with a teacher feature of "
                          f"shape {teacher_shape}", "pair feature maps with maps and vectors with vectors")
    cs, ct = student_shape[0], teacher_shape[0]
    if cs == ct:
        return nn.Identity()
    if len(student_shape) == 3:
        return nn.Conv2d(cs, ct, 1, bias=False)
    if len(student_shape) == 1:
        return nn.Linear(cs, ct, bias=False)
    raise ConfigError(f"no adapter for features of shape {student_shape}", "name 2-D or 4-D outputs")


def regressor(student_shape: tuple, teacher_shape: tuple) -> nn.Module:
    """FitNets' regressor as RepDistiller (models/util.py) and mdistiller (distillers/_common.py) build
    it, ``ConvReg``: a conv to the teacher's channels, batch norm, ReLU. The conv follows their size
    rules: 3x3 stride 2 when the student's map is twice the teacher's, 4x4 stride-2 transposed when it is
    half, a valid conv of size (1 + Hs - Ht, 1 + Ws - Wt) when it is larger, 1x1 when equal; height and
    width are compared separately (they compare heights only). A student map smaller than the teacher's
    otherwise (they refuse it) gets a 1x1 conv and the term pools the teacher's map down. Vectors: a
    linear layer (no reference; no batch norm, which a batch of one would break)."""
    if len(student_shape) != len(teacher_shape):
        raise ConfigError(f"cannot pair a student feature of shape {student_shape} with a teacher feature of "
                          f"shape {teacher_shape}", "pair feature maps with maps and vectors with vectors")
    if len(student_shape) == 1:
        return nn.Linear(student_shape[0], teacher_shape[0])
    if len(student_shape) != 3:
        raise ConfigError(f"no regressor for features of shape {student_shape}", "name 2-D or 4-D outputs")
    (cs, hs, ws), (ct, ht, wt) = student_shape, teacher_shape
    if (hs, ws) == (2 * ht, 2 * wt):
        conv = nn.Conv2d(cs, ct, 3, stride=2, padding=1)
    elif (2 * hs, 2 * ws) == (ht, wt):
        conv = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1)
    elif hs >= ht and ws >= wt:
        conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt))
    else:
        conv = nn.Conv2d(cs, ct, 1)
    return nn.Sequential(conv, nn.BatchNorm2d(ct), nn.ReLU())


def layer_table(model: nn.Module, x: torch.Tensor) -> list[dict]:
    """The layers of ``model`` a term can name: leaf modules that run, with output shapes."""
    return [{"name": n, "type": k, "shape": list(s)} for n, k, s in run_order(model, x)]
