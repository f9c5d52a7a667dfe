"""Knowledge-distillation losses, registered by name, and their weighted sum (an ``Objective``).

A *term* is a small dataclass. It is called as ``term(student_logits, teacher_logits, labels, feats)``
and returns the scalar loss and a dict of its named parts (floats, for logging). ``teacher_logits``
is None for terms that need no teacher; ``feats`` (a ``features.Feats``) holds the intermediate
outputs of the layers a feature term names, for the student and the teacher.

Every term states its paper defaults twice: its own hyper-parameters (dataclass fields) and, as
class attributes, ``weight`` (its weight in the sum) and ``ce_weight`` (the weight of the
cross-entropy on labels that goes with it). ``--method NAME`` builds ``ce_weight * CE + weight *
NAME``; a recipe (``--config FILE``) lists terms and weights explicitly.

Families: response-based (hinton, kd, mse, dkd, tfkd), feature-based (fitnet, at), relation-based
(rkd, fsp). Hooks and adapters live in edgekd.features.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .registry import Registry, suggest

LOSSES: Registry = Registry("distillation method")


# ---- response-based ------------------------------------------------------------------------------

def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch.

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones
    when the temperature changes.
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * temperature**2


def _f(value) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _positive(term, *names: str) -> None:
    for name in names:
        if getattr(term, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(term, name)}")


class Term:
    """Base of every registered loss term (see the module docstring)."""

    needs_teacher = True
    weight = 1.0  # paper default weight of this term in a single-method objective
    ce_weight = 1.0  # paper default weight of the label cross-entropy that goes with it
    student_layers: tuple[str, ...] = ()
    teacher_layers: tuple[str, ...] = ()

    def setup(self, probe) -> None:
        """Resolve layer names and build adapters (feature terms); ``probe`` is a features.Probe."""

    def parameters(self) -> list[nn.Parameter]:
        """Learned parameters of the term (adapters), trained with the student."""
        return []


@LOSSES.register("hinton")
@dataclass
class HintonKD(Term):
    """Hinton et al. 2015: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels).

    Defaults: T=4, alpha=0.9 (common practice on small image datasets). Includes its own label term.
    """

    temperature: float = 4.0
    alpha: float = 0.9
    ce_weight = 0.0

    def __post_init__(self):
        _positive(self, "temperature")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")

    def __call__(self, student_logits, teacher_logits, labels, feats=None):
        kd = kd_divergence(student_logits, teacher_logits, self.temperature)
        ce = F.cross_entropy(student_logits, labels)
        total = self.alpha * kd + (1.0 - self.alpha) * ce
        return total, {"kd": kd.item(), "ce": ce.item()}


@LOSSES.register("none")
@dataclass
class CrossEntropyOnly(Term):
    """No distillation: cross-entropy on the labels (the QAT-only baseline)."""

    needs_teacher = False
    ce_weight = 0.0

    def __call__(self, student_logits, teacher_logits, labels, feats=None):
        ce = F.cross_entropy(student_logits, labels)
        return ce, {"ce": ce.item()}


@LOSSES.register("ce")
@dataclass
class CrossEntropy(CrossEntropyOnly):
    """Cross-entropy on the labels, as a recipe term (label_smoothing 0 = plain CE)."""

    label_smoothing: float = 0.0

    def __call__(self, student_logits, teacher_logits, labels, feats=None):
        ce = F.cross_entropy(student_logits, labels, label_smoothing=self.label_smoothing)
        return ce, {"ce": ce.item()}


@LOSSES.register("kd")
@dataclass
class SoftTargets(Term):
    """The soft-target term alone, T^2 * KL(teacher_T || student_T) (Hinton et al. 2015), T=4.

    As ``--method kd``: 0.1 * CE + 0.9 * KD, the same objective as ``hinton``.
    """

    temperature: float = 4.0
    weight = 0.9
    ce_weight = 0.1

    def __post_init__(self):
        _positive(self, "temperature")

    def __call__(self, student_logits, teacher_logits, labels, feats=None):
        kd = kd_divergence(student_logits, teacher_logits, self.temperature)
        return kd, {"kd": kd.item()}


@LOSSES.register("mse")
@dataclass
class LogitMSE(Term):
    """Ba & Caruana 2014, logit matching: mean over batch and classes of (z_s - z_t)^2 / 2.

    The paper regresses the teacher's logits with no labels: ce_weight 0, weight 1.
    """

    ce_weight = 0.0

    def __call__(self, student_logits, teacher_logits, labels, feats=None):
        mse = 0.5 * (student_logits - teacher_logits.to(student_logits.dtype)).pow(2).mean()
        return mse, {"mse": mse.item()}


def _masked_softmax_parts(logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    """(binary target/non-target probabilities, log-probabilities among non-target classes) at T."""
    p = F.softmax(logits / temperature, dim=1)
    gt = F.one_hot(labels, logits.shape[1]).to(torch.bool)
    p_target = p[gt].unsqueeze(1)
    binary = torch.cat([p_target, 1.0 - p_target], dim=1).clamp_min(1e-12)
    log_nontarget = F.log_softmax(logits / temperature - 1000.0 * gt, dim=1)
    return binary, log_nontarget, gt


def dkd_parts(student_logits, teacher_logits, labels, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zhao et al. 2022: (TCKD, NCKD), each T^2 * KL, averaged over the batch.

    TCKD compares the binary (target, rest) distributions; NCKD the distributions among the
    non-target classes. Classical KD = TCKD + (1 - p_t^teacher) * NCKD (the paper's Eq. 7).
    """
    bs, log_ns, gt = _masked_softmax_parts(student_logits, labels, temperature)
    bt, log_nt, _ = _masked_softmax_parts(teacher_logits.to(student_logits.dtype), labels, temperature)
    tckd = (bt * (bt.log() - bs.log())).sum(1).mean() * temperature**2
    nt = log_nt.exp().masked_fill(gt, 0.0)
    nckd = (nt * (log_nt - log_ns)).masked_fill(gt, 0.0).sum(1).mean() * temperature**2
    return tckd, nckd


@LOSSES.register("dkd")
@dataclass
class DecoupledKD(Term):
    """Zhao et al. 2022 (DKD): alpha * TCKD + beta * NCKD at temperature T.

    Paper defaults (CIFAR-100): alpha=1, beta=8, T=4, with CE weight 1. (The paper's 20-epoch
    linear warm-up of the KD weight is not applied.)
    """

    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0

    def __post_init__(self):
        _positive(self, "temperature")

    def __call__(self, student_logits, teacher_logits, labels, feats=None):
        tckd, nckd = dkd_parts(student_logits, teacher_logits, labels, self.temperature)
        return self.alpha * tckd + self.beta * nckd, {"tckd": tckd.item(), "nckd": nckd.item()}


@LOSSES.register("tfkd")
@dataclass
class TeacherFreeKD(Term):
    """Yuan et al. 2020, Tf-KD_reg (teacher-free self-distillation): a virtual teacher puts
    ``correct_prob`` on the label and spreads the rest evenly; loss = multiplier * KL(softmax(u / T) ||
    softmax(s)) / K. The authors' code takes PyTorch's ``nn.KLDivLoss()`` with its default element-wise
    mean, which divides the per-sample KL by the number of classes K as well: kept here, since the
    multiplier was tuned with it (without it the term is K times stronger and, measured on Fashion-MNIST
    W4A4, drags accuracy from 80% to 33-49%). Defaults from their code: correct_prob=0.99, T=20,
    multiplier=100, weighted 0.95 against CE 0.05 (their reg_alpha). Needs no teacher.
    """

    correct_prob: float = 0.99
    temperature: float = 20.0
    multiplier: float = 100.0
    needs_teacher = False
    weight = 0.95
    ce_weight = 0.05

    def __post_init__(self):
        _positive(self, "temperature")
        if not 0.0 < self.correct_prob < 1.0:
            raise ConfigError(f"correct_prob must be in (0, 1), got {self.correct_prob}")

    def virtual_teacher(self, labels: torch.Tensor, classes: int) -> torch.Tensor:
        u = torch.full((len(labels), classes), (1.0 - self.correct_prob) / (classes - 1))
        u[torch.arange(len(labels)), labels] = self.correct_prob
        return F.softmax(u / self.temperature, dim=1)

    def __call__(self, student_logits, teacher_logits, labels, feats=None):
        q = self.virtual_teacher(labels, student_logits.shape[1]).to(student_logits)
        classes = student_logits.shape[1]
        kl = (q * (q.log() - F.log_softmax(student_logits, dim=1))).sum(1).mean() / classes * self.multiplier
        return kl, {"tfkd": kl.item()}


# ---- feature-based -------------------------------------------------------------------------------

@dataclass
class _FeatureTerm(Term):
    """Pairs of student/teacher layers named by module path (``None``: chosen automatically)."""

    student: list[str] | None = None
    teacher: list[str] | None = None
    adapters: nn.ModuleList | None = field(default=None, init=False, repr=False, compare=False)

    auto = "stages"  # how features.Probe picks layers when none are named

    def __post_init__(self):
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

    def parameters(self) -> list[nn.Parameter]:
        return list(self.adapters.parameters()) if self.adapters is not None else []

    def pairs(self, feats):
        return [(feats.student[s], feats.teacher[t].to(feats.student[s].dtype)) for s, t in zip(self.student, self.teacher)]


def _pool_to(x: torch.Tensor, size) -> torch.Tensor:
    return x if x.ndim < 4 or tuple(x.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(x, size)


@LOSSES.register("fitnet")
@dataclass
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

    def __call__(self, student_logits, teacher_logits, labels, feats=None):
        loss = sum(F.mse_loss(_pool_to(a(s), t.shape[-2:]), t) for a, (s, t) in zip(self.adapters, self.pairs(feats)))
        return loss, {"hint": _f(loss)}


def attention_map(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017: mean over channels of |x|^p, flattened and L2-normalized."""
    return F.normalize(x.abs().pow(p).mean(1).flatten(1), dim=1)


@LOSSES.register("at")
@dataclass
class AttentionTransfer(_FeatureTerm):
    """Zagoruyko & Komodakis 2017: sum over layer pairs of mean((Q_s - Q_t)^2) / 2, Q = attention_map
    (p=2). Weight beta=1000 (paper). Maps of different sizes: the larger is average-pooled.
    Default layers: for each resolution both networks share, the last output at it.
    """

    p: float = 2.0
    weight = 1000.0

    def __call__(self, student_logits, teacher_logits, labels, feats=None):
        loss = 0.0
        for s, t in self.pairs(feats):
            size = min(s.shape[-2:], t.shape[-2:])
            loss = loss + 0.5 * (attention_map(_pool_to(s, size), self.p) - attention_map(_pool_to(t, size), self.p)).pow(2).mean()
        return loss, {"at": _f(loss)}


# ---- relation-based ------------------------------------------------------------------------------

def _pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    d = (e.unsqueeze(0) - e.unsqueeze(1)).pow(2).sum(-1).clamp_min(1e-12).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device)) * (d > 1e-6)


def rkd_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Park et al. 2019: Huber loss between pairwise distances, each normalized by its mean."""
    def norm(e):
        d = _pairwise_distances(e.flatten(1))
        mean = d.sum() / (d > 1e-6).sum().clamp_min(1)  # over distinct pairs; all-equal points: 0, not NaN
        return d / mean.clamp_min(1e-6)

    return F.smooth_l1_loss(norm(s), norm(t))


def rkd_angle(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Park et al. 2019: Huber loss between the cosines of the angles of all triplets."""
    def angles(e):
        e = e.flatten(1)
        diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)
        return torch.bmm(diff, diff.transpose(1, 2)).flatten()

    return F.smooth_l1_loss(angles(s), angles(t))


@LOSSES.register("rkd")
@dataclass
class RelationalKD(_FeatureTerm):
    """Park et al. 2019 (RKD): distance_weight * RKD-D + angle_weight * RKD-A on an embedding.

    Paper defaults: distance 25, angle 50. Default layer: the penultimate embedding (the last
    flat output before the classifier) of each network; name ``logits`` to use the logits.
    """

    distance_weight: float = 25.0
    angle_weight: float = 50.0
    auto = "embedding"

    def __call__(self, student_logits, teacher_logits, labels, feats=None):
        dist = ang = 0.0
        for s, t in self.pairs(feats):
            dist, ang = dist + rkd_distance(s, t), ang + rkd_angle(s, t)
        return self.distance_weight * dist + self.angle_weight * ang, {"rkd_d": _f(dist), "rkd_a": _f(ang)}


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Yim et al. 2017: G = a^T b / (H W) between two maps (the larger is average-pooled)."""
    size = min(a.shape[-2:], b.shape[-2:])
    a, b = _pool_to(a, size).flatten(2), _pool_to(b, size).flatten(2)
    return torch.bmm(a, b.transpose(1, 2)) / a.shape[-1]


@LOSSES.register("fsp")
@dataclass
class FlowOfSolution(_FeatureTerm):
    """Yim et al. 2017 (FSP): mean squared difference between student and teacher Gram matrices of
    consecutive layer pairs (l1, l2), (l2, l3), ... Student maps whose channels differ from the
    teacher's pass a learned 1x1 conv. Weight 1 (the paper weights all pairs equally).
    Default layers: for each resolution both networks share, the last output at it (at least 2).
    """

    def build_adapters(self, probe):
        from .features import adapter

        return [adapter(probe.student_shape(s), probe.teacher_shape(t), spatial=False)
                for s, t in zip(self.student, self.teacher)]

    def __call__(self, student_logits, teacher_logits, labels, feats=None):
        maps = [(a(s), t) for a, (s, t) in zip(self.adapters, self.pairs(feats))]
        if len(maps) < 2:
            raise ConfigError("fsp needs at least two layer pairs", "name two or more layers in 'student' and 'teacher'")
        loss = sum((fsp_matrix(s1, s2) - fsp_matrix(t1, t2)).pow(2).mean()
                   for (s1, t1), (s2, t2) in zip(maps, maps[1:]))
        return loss, {"fsp": _f(loss)}


# ---- building ------------------------------------------------------------------------------------

def term_params(cls) -> dict:
    """A term's hyper-parameters and their defaults (the dataclass fields a user may set)."""
    return {f.name: f.default for f in fields(cls) if f.init}


def make_loss(method: str, **params):
    """Build a registered term; unknown parameters fail with a did-you-mean and the accepted ones."""
    cls = LOSSES.get(method)
    accepted = term_params(cls)
    bad = [k for k in params if k not in accepted]
    if bad:
        raise ConfigError(f"method {method!r} has no parameter {bad[0]!r}{suggest(bad[0], list(accepted))}",
                          f"its parameters: {', '.join(accepted) or 'none'}")
    for key, value in params.items():  # a number parameter given as text fails here, not mid-training
        if isinstance(accepted[key], float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"method {method!r}: parameter {key!r} must be a number, got {value!r}",
                              f"e.g. {key}={accepted[key]:g}")
    return cls(**params)


def describe_methods() -> list[dict]:
    """One row per registered term: name, summary line, parameters with defaults, weights."""
    rows = []
    for name in LOSSES:
        cls = LOSSES.get(name)
        doc = inspect.getdoc(cls) or ""
        rows.append({"name": name, "summary": doc.split("\n")[0], "params": term_params(cls),
                     "weight": cls.weight, "ce_weight": cls.ce_weight, "needs_teacher": cls.needs_teacher})
    return rows


class Objective:
    """A weighted sum of terms (torchdistill's WeightedSumLoss); what train.fit calls.

    ``Objective.single(name, **params)`` is ``--method NAME``: the term at its paper weight plus
    cross-entropy at the paper's ce_weight. ``Objective.from_specs([{"name":..., "weight":..., ...}])``
    is a recipe.
    """

    def __init__(self, terms: list[tuple[str, float, Term]]):
        if not terms:
            raise ConfigError("a distillation objective needs at least one loss term")
        self.terms = terms

    @classmethod
    def single(cls, method: str, **params) -> "Objective":
        term = make_loss(method, **params)
        terms = [(method, float(term.weight), term)]
        if term.ce_weight:
            terms.insert(0, ("ce", float(term.ce_weight), CrossEntropy()))
        return cls(terms)

    @classmethod
    def from_specs(cls, specs: list[dict]) -> "Objective":
        terms = []
        for spec in specs:
            spec = dict(spec)
            name = spec.pop("name")
            weight = spec.pop("weight", None)
            term = make_loss(name, **spec)
            if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
                raise ConfigError(f"loss term {name!r}: weight must be a number, got {weight!r}")
            terms.append((name, float(term.weight if weight is None else weight), term))
        return cls(terms)

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for _, _, t in self.terms)

    @property
    def student_layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for _, _, t in self.terms for n in t.student_layers))

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for _, _, t in self.terms for n in t.teacher_layers))

    @property
    def wants_layers(self) -> bool:
        return any(isinstance(t, _FeatureTerm) for _, _, t in self.terms)

    @property
    def needs_setup(self) -> bool:
        """True until the feature terms' layers are resolved and their adapters built."""
        return any(isinstance(t, _FeatureTerm) and t.adapters is None for _, _, t in self.terms)

    @property
    def name(self) -> str:
        return "+".join(n for n, _, _ in self.terms if n != "ce") or "none"

    def setup(self, probe) -> None:
        for _, _, term in self.terms:
            term.setup(probe)

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, _, t in self.terms for p in t.parameters()]

    def __call__(self, student_logits, teacher_logits, labels, feats=None):
        total, parts = 0.0, {}
        for name, weight, term in self.terms:
            value, sub = term(student_logits, teacher_logits, labels, feats)
            total = total + weight * value
            parts.update({k if k not in parts else f"{name}.{k}": v for k, v in sub.items()})
        return total, parts

    def describe(self) -> list[dict]:
        """The resolved terms (layers and defaults filled in), as a recipe's ``[[loss]]`` list."""
        return [{"name": n, "weight": w, **{f.name: getattr(t, f.name) for f in fields(t) if f.init}}
                for n, w, t in self.terms]
