"""Response-based distillation: terms on the networks' outputs (hinton, kd, mse, dkd, tfkd, ce, none)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError
from .objective import LOSSES, Term, _positive


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch.

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones
    when the temperature changes.
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * temperature**2


@LOSSES.register("hinton")
@dataclass(eq=False)
class HintonKD(Term):
    """Hinton et al. 2015: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels).

    Defaults: T=4, alpha=0.9 (common practice on small image datasets). Includes its own label term.
    """

    temperature: float = 4.0
    alpha: float = 0.9
    ce_weight = 0.0

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "temperature")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")

    def forward(self, student_logits, teacher_logits, labels, feats=None):
        kd = kd_divergence(student_logits, teacher_logits, self.temperature)
        ce = F.cross_entropy(student_logits, labels)
        total = self.alpha * kd + (1.0 - self.alpha) * ce
        return total, {"kd": kd.item(), "ce": ce.item()}


@LOSSES.register("none")
@dataclass(eq=False)
class CrossEntropyOnly(Term):
    """No distillation: cross-entropy on the labels (the QAT-only baseline)."""

    needs_teacher = False
    ce_weight = 0.0

    def forward(self, student_logits, teacher_logits, labels, feats=None):
        ce = F.cross_entropy(student_logits, labels)
        return ce, {"ce": ce.item()}


@LOSSES.register("ce")
@dataclass(eq=False)
class CrossEntropy(CrossEntropyOnly):
    """Cross-entropy on the labels, as a recipe term (label_smoothing 0 = plain CE)."""

    label_smoothing: float = 0.0

    def forward(self, student_logits, teacher_logits, labels, feats=None):
        ce = F.cross_entropy(student_logits, labels, label_smoothing=self.label_smoothing)
        return ce, {"ce": ce.item()}


@LOSSES.register("kd")
@dataclass(eq=False)
class SoftTargets(Term):
    """The soft-target term alone, T^2 * KL(teacher_T || student_T) (Hinton et al. 2015), T=4.

    As ``--method kd``: 0.1 * CE + 0.9 * KD, the same objective as ``hinton``.
    """

    temperature: float = 4.0
    weight = 0.9
    ce_weight = 0.1

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "temperature")

    def forward(self, student_logits, teacher_logits, labels, feats=None):
        kd = kd_divergence(student_logits, teacher_logits, self.temperature)
        return kd, {"kd": kd.item()}


@LOSSES.register("mse")
@dataclass(eq=False)
class LogitMSE(Term):
    """Ba & Caruana 2014, logit matching: mean over batch and classes of (z_s - z_t)^2 / 2.

    The paper regresses the teacher's logits with no labels: ce_weight 0, weight 1.
    """

    ce_weight = 0.0

    def forward(self, student_logits, teacher_logits, labels, feats=None):
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
@dataclass(eq=False)
class DecoupledKD(Term):
    """Zhao et al. 2022 (DKD): alpha * TCKD + beta * NCKD at temperature T.

    Paper defaults (CIFAR-100): alpha=1, beta=8, T=4, with CE weight 1. (The paper's 20-epoch
    linear warm-up of the KD weight is not applied.)
    """

    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "temperature")

    def forward(self, student_logits, teacher_logits, labels, feats=None):
        tckd, nckd = dkd_parts(student_logits, teacher_logits, labels, self.temperature)
        return self.alpha * tckd + self.beta * nckd, {"tckd": tckd.item(), "nckd": nckd.item()}


@LOSSES.register("tfkd")
@dataclass(eq=False)
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
        super().__post_init__()
        _positive(self, "temperature")
        if not 0.0 < self.correct_prob < 1.0:
            raise ConfigError(f"correct_prob must be in (0, 1), got {self.correct_prob}")

    def virtual_teacher(self, labels: torch.Tensor, classes: int) -> torch.Tensor:
        u = torch.full((len(labels), classes), (1.0 - self.correct_prob) / (classes - 1))
        u[torch.arange(len(labels)), labels] = self.correct_prob
        return F.softmax(u / self.temperature, dim=1)

    def forward(self, student_logits, teacher_logits, labels, feats=None):
        q = self.virtual_teacher(labels, student_logits.shape[1]).to(student_logits)
        classes = student_logits.shape[1]
        kl = (q * (q.log() - F.log_softmax(student_logits, dim=1))).sum(1).mean() / classes * self.multiplier
        return kl, {"tfkd": kl.item()}
