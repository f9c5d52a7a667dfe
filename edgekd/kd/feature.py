"""Feature-based distillation: terms on intermediate layers (fitnet, at); hooks live in kd.features."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config.options import shown
from ..core.errors import ConfigError
from .objective import LOSSES, Term, _f, bounded, method_name


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
                setattr(self, side, [_layer_name(v, self, side) for v in
                                     (value if isinstance(value, (list, tuple)) else [value])])

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


def _layer_name(value, term, side: str) -> str:
    """A layer named by module path (a string, or an integer index of a Sequential)."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**6):
        return str(value)
    raise ConfigError(f"method {method_name(type(term))!r}: parameter {side!r} must name layers (a module path "
                      f"or a list of them), got {shown(value)}", f'e.g. {side}=["5", "8.relu"] (see --list-layers)')


def _pool_to(x: torch.Tensor, size) -> torch.Tensor:
    return x if x.ndim < 4 or tuple(x.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(x, tuple(size))


def common_size(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two maps at one size: height and width compared separately, the larger of each average-pooled
    to the smaller (RepDistiller's and mdistiller's at_loss compare the heights only and pool to a
    square, which is wrong for maps that are not square)."""
    if a.ndim < 4 or b.ndim < 4:
        return a, b
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    return _pool_to(a, size), _pool_to(b, size)


@LOSSES.register("fitnet")
@dataclass(eq=False)
class FitNets(_FeatureTerm):
    """Romero et al. 2015 (FitNets hints): MSE between a learned regressor of the student's feature and
    the teacher's (the hint).

    As both reference codes build it (RepDistiller models/util.py and mdistiller distillers/_common.py
    ``ConvReg``; kd.features.regressor): conv + BN + ReLU to the teacher's channels, one stage, hint
    weight 100 with CE weight 1 (mdistiller CFG.FITNET; RepDistiller run_cifar_distill.sh ``-b 100``),
    hint layer 2 of [stem, stage 1, 2, 3] (``HINT_LAYER``/``--hint_layer`` 2), i.e. the middle stage:
    edgekd's automatic choice is the last output at the middle resolution both networks share. The
    paper trains the hint in a separate first stage; both codes use one stage, kept here.
    """

    weight = 100.0
    auto = "middle"

    def build_adapters(self, probe):
        from .features import regressor

        return [regressor(probe.student_shape(s), probe.teacher_shape(t)) for s, t in zip(self.student, self.teacher)]

    def forward(self, student_logits, teacher_logits, labels, feats=None):
        loss = sum(F.mse_loss(*common_size(a(s), t)) for a, (s, t) in zip(self.adapters, self.pairs(feats)))
        return loss, {"hint": _f(loss)}


def attention_map(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017: mean over channels of |x|^p, flattened and L2-normalized."""
    return F.normalize(x.abs().pow(p).mean(1).flatten(1), dim=1)


@LOSSES.register("at")
@dataclass(eq=False)
class AttentionTransfer(_FeatureTerm):
    """Zagoruyko & Komodakis 2017: beta * sum over layer pairs of mean((Q_s - Q_t)^2), Q = attention_map
    (p=2). No 1/2: the three reference codes (szagoruyko/attention-transfer utils.py ``at_loss`` with
    cifar.py ``opt.beta * sum(loss_groups)``; RepDistiller distiller_zoo/AT.py; mdistiller
    distillers/AT.py ``at_loss``) sum the plain means (the paper writes beta/2 times a norm of the
    difference; beta was tuned with the codes' form). beta = 1000 (their READMEs and configs:
    ``--beta 1e+3``, ``-b 1000``, CFG.AT FEAT_WEIGHT 1000) with CE weight 1. Maps of different sizes:
    height and width pooled separately to the smaller. Default layers: for each resolution both
    networks share, the last output at it (the references pair every stage's output).
    """

    p: float = bounded(2.0, lo=0, lo_open=True, hi=16)
    weight = 1000.0

    def forward(self, student_logits, teacher_logits, labels, feats=None):
        loss = 0.0
        for s, t in self.pairs(feats):
            s, t = common_size(s, t)
            loss = loss + (attention_map(s, self.p) - attention_map(t, self.p)).pow(2).mean()
        return loss, {"at": _f(loss)}
