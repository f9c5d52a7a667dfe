"""Feature-based distillation: terms on intermediate layers (fitnet, at); hooks live in kd.features."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .objective import LOSSES, Term, _f


@dataclass(eq=False)
class _FeatureTerm(Term):
    """Pairs of student/teacher layers named by module path (``None``: chosen automatically)."""

    student: list[str] | None = None
    teacher: list[str] | None = None

    auto = "stages"  # how features.Probe picks layers when none are named

    def __post_init__(self):
        super().__post_init__()
        self.adapters: nn.ModuleList | None = None  # built by setup (a submodule then, not a field)
        for side in ("student", "teacher"):
            value = getattr(self, side)
            if value is not None:
                setattr(self, side, [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])])

    def setup(self, probe) -> None:
        if self.adapters is not None:
            return
        self.student, self.teacher = probe.pairs(self.student, self.teacher, self.auto)
        self.student_layers, self.teacher_layers = tuple(self.student), tuple(self.teacher)
        self.adapters = nn.ModuleList(self.build_adapters(probe))

    def build_adapters(self, probe) -> list[nn.Module]:
        return []

    @property
    def wants_layers(self) -> bool:
        return True

    @property
    def needs_setup(self) -> bool:
        """True until the layers are resolved and the adapters built."""
        return self.adapters is None

    def pairs(self, feats):
        return [(feats.student[s], feats.teacher[t].to(feats.student[s].dtype)) for s, t in zip(self.student, self.teacher)]


def _pool_to(x: torch.Tensor, size) -> torch.Tensor:
    return x if x.ndim < 4 or tuple(x.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(x, size)


@LOSSES.register("fitnet")
@dataclass(eq=False)
class FitNets(_FeatureTerm):
    """Romero et al. 2015 (FitNets hints): MSE between a learned adapter of the student's feature
    (1x1 conv for maps, linear for vectors, identity when shapes agree) and the teacher's.

    Default layers: the last student and teacher outputs at the deepest resolution both share.
    Trained in one stage with CE weight 1 and hint weight 100 (mdistiller's single-stage FitNets).
    """

    weight = 100.0
    auto = "last"

    def build_adapters(self, probe):
        from .features import adapter

        return [adapter(probe.student_shape(s), probe.teacher_shape(t)) for s, t in zip(self.student, self.teacher)]

    def forward(self, student_logits, teacher_logits, labels, feats=None):
        loss = sum(F.mse_loss(_pool_to(a(s), t.shape[-2:]), t) for a, (s, t) in zip(self.adapters, self.pairs(feats)))
        return loss, {"hint": _f(loss)}


def attention_map(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017: mean over channels of |x|^p, flattened and L2-normalized."""
    return F.normalize(x.abs().pow(p).mean(1).flatten(1), dim=1)


@LOSSES.register("at")
@dataclass(eq=False)
class AttentionTransfer(_FeatureTerm):
    """Zagoruyko & Komodakis 2017: sum over layer pairs of mean((Q_s - Q_t)^2) / 2, Q = attention_map
    (p=2). Weight beta=1000 (paper). Maps of different sizes: the larger is average-pooled.
    Default layers: for each resolution both networks share, the last output at it.
    """

    p: float = 2.0
    weight = 1000.0

    def forward(self, student_logits, teacher_logits, labels, feats=None):
        loss = 0.0
        for s, t in self.pairs(feats):
            size = min(s.shape[-2:], t.shape[-2:])
            loss = loss + 0.5 * (attention_map(_pool_to(s, size), self.p) - attention_map(_pool_to(t, size), self.p)).pow(2).mean()
        return loss, {"at": _f(loss)}
