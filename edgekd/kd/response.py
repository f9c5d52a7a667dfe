"""Response-based distillation: terms on the networks' outputs (hinton, kd, mse, dkd, tfkd, ce, none)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .objective import LOSSES, Term, bounded, kd_temperature, nonnegative
from .teachers import logit_target, soft_log_probs, summed_over


def kd_divergence(student_logits: torch.Tensor, teacher_logits, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch.

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones
    when the temperature changes. ``teacher_logits`` may be a kd.Teachers: an ensemble's target is
    the average of its members' outputs softened at this T; a DML group gives one KL per network,
    summed.
    """
    def one(teacher):
        log_p_t = soft_log_probs(teacher, temperature)
        log_p_s = F.log_softmax(student_logits / temperature, dim=1)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean() * temperature**2

    return summed_over(teacher_logits, one)


@LOSSES.register("hinton")
@dataclass(eq=False)
class HintonKD(Term):
    """Hinton et al. 2015: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels).

    Defaults T=4, alpha=0.9: the CIFAR-100 configuration of mdistiller (mdistiller/engine/cfg.py CFG.KD:
    T 4, CE 0.1, KD 0.9) and RepDistiller (scripts/run_cifar_distill.sh, kd: -r 0.1 -a 0.9, kd_T 4); the
    paper fixes no T. Includes its own label term.
    """

    temperature: float = kd_temperature(4.0)
    alpha: float = bounded(0.9, lo=0, hi=1)
    ce_weight = 0.0

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

    label_smoothing: float = bounded(0.0, lo=0, hi=1)

    def forward(self, student_logits, teacher_logits, labels, feats=None):
        ce = F.cross_entropy(student_logits, labels, label_smoothing=self.label_smoothing)
        return ce, {"ce": ce.item()}


@LOSSES.register("kd")
@dataclass(eq=False)
class SoftTargets(Term):
    """The soft-target term alone, T^2 * KL(teacher_T || student_T) (Hinton et al. 2015), T=4.

    As ``--method kd``: 0.1 * CE + 0.9 * KD, the same objective as ``hinton`` (mdistiller CFG.KD, the
    same numbers as its ``kd_loss``; RepDistiller ``DistillKL``).
    """

    temperature: float = kd_temperature(4.0)
    weight = 0.9
    ce_weight = 0.1

    def forward(self, student_logits, teacher_logits, labels, feats=None):
        kd = kd_divergence(student_logits, teacher_logits, self.temperature)
        return kd, {"kd": kd.item()}


@LOSSES.register("mse")
@dataclass(eq=False)
class LogitMSE(Term):
    """Ba & Caruana 2014, logit matching: 1/2 * sum over classes of (z_s - z_t)^2, averaged over the batch.

    The paper's L2 loss on logits is 1/(2N) sum_n ||g(x_n) - z_n||^2: the half of the per-sample squared
    distance, summed over the classes (not averaged over them). Common re-implementations use
    ``nn.MSELoss()``, the mean over batch and classes without the half (e.g. Kim et al. 2021,
    jhoon-oh/kd_data, tools/losses.py ``mse_logit``: 2/K times this); the paper's form is kept, whose
    gradient is z_s - z_t. The paper regresses the teacher's logits with no labels: ce_weight 0,
    weight 1. An ensemble teacher: the members' weighted mean logits.
    """

    ce_weight = 0.0

    def forward(self, student_logits, teacher_logits, labels, feats=None):
        def one(teacher):
            target = logit_target(teacher).to(student_logits.dtype)
            return 0.5 * (student_logits - target).pow(2).sum(dim=1).mean()

        mse = summed_over(teacher_logits, one)
        return mse, {"mse": mse.item()}


def _masked_parts(log_p: torch.Tensor, labels: torch.Tensor):
    """From log-probabilities at T: the binary (target, rest) distribution and the log-probabilities
    among the non-target classes (log_softmax(log_p - 1000 * gt), as mdistiller masks the logits)."""
    gt = F.one_hot(labels, log_p.shape[1]).to(torch.bool)
    p_target = log_p.exp()[gt].unsqueeze(1)
    binary = torch.cat([p_target, 1.0 - p_target], dim=1).clamp_min(1e-12)
    log_nontarget = F.log_softmax(log_p - 1000.0 * gt, dim=1)
    return binary, log_nontarget, gt


def dkd_parts(student_logits, teacher_logits, labels, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zhao et al. 2022: (TCKD, NCKD), each T^2 * KL, averaged over the batch (mdistiller,
    mdistiller/distillers/DKD.py ``dkd_loss``).

    TCKD compares the binary (target, rest) distributions; NCKD the distributions among the
    non-target classes. Classical KD = TCKD + (1 - p_t^teacher) * NCKD (the paper's Eq. 7). Both are
    taken from the teacher's distribution at T, so an ensemble (kd.Teachers) is decoupled from the
    average of its members' softened outputs; a DML group gives one pair per network, summed.
    """
    def one(teacher):
        bs, log_ns, gt = _masked_parts(F.log_softmax(student_logits / temperature, dim=1), labels)
        log_pt = soft_log_probs(teacher, temperature).to(student_logits.dtype)
        bt, log_nt, _ = _masked_parts(log_pt, labels)
        tckd = (bt * (bt.log() - bs.log())).sum(1).mean() * temperature**2
        nt = log_nt.exp().masked_fill(gt, 0.0)
        nckd = (nt * (log_nt - log_ns)).masked_fill(gt, 0.0).sum(1).mean() * temperature**2
        return tckd, nckd

    return summed_over(teacher_logits, one)


@LOSSES.register("dkd")
@dataclass(eq=False)
class DecoupledKD(Term):
    """Zhao et al. 2022 (DKD): ramp * (alpha * TCKD + beta * NCKD) at temperature T.

    Defaults: mdistiller's CIFAR-100 configuration (mdistiller/engine/cfg.py CFG.DKD and
    configs/cifar100/dkd/res32x4_res8x4.yaml): alpha=1, beta=8, T=4, CE weight 1. The authors ramp
    the KD term up linearly, min(epoch / WARMUP, 1) with WARMUP = 20 of 240 epochs (DKD.forward_train).
    edgekd's phases last a few epochs, so ``warmup`` is the same share of the phase, 20/240 = 1/12 of
    its epochs, and the ramp advances every step (the loop calls Objective.set_epoch before each step
    with the fractional epoch); 0 turns it off. Outside a training loop (no set_epoch) the ramp is 1.
    """

    alpha: float = nonnegative(1.0)
    beta: float = nonnegative(8.0)
    temperature: float = kd_temperature(4.0)
    warmup: float = bounded(20.0 / 240.0, lo=0, hi=1)  # a fraction of the phase's epochs

    def __post_init__(self):
        super().__post_init__()
        self.ramp = 1.0

    def set_epoch(self, epoch: float, epochs: int) -> None:
        span = self.warmup * epochs
        self.ramp = min(epoch / span, 1.0) if span > 0 else 1.0

    def forward(self, student_logits, teacher_logits, labels, feats=None):
        tckd, nckd = dkd_parts(student_logits, teacher_logits, labels, self.temperature)
        loss = self.ramp * (self.alpha * tckd + self.beta * nckd)
        return loss, {"tckd": tckd.item(), "nckd": nckd.item(), "dkd_ramp": self.ramp}


@LOSSES.register("tfkd")
@dataclass(eq=False)
class TeacherFreeKD(Term):
    """Yuan et al. 2020, Tf-KD_reg (teacher-free self-distillation): a virtual teacher puts
    ``correct_prob`` on the label and spreads the rest evenly; loss = multiplier * KL(softmax(u / T) ||
    softmax(s)) / K, weighted alpha against (1 - alpha) * CE. As in the authors' code
    (yuanli2333/Teacher-free-Knowledge-Distillation, my_loss_function.py ``loss_kd_regularization``):
    the student is not softened, there is no T^2, and ``nn.KLDivLoss()``'s default element-wise mean
    divides the per-sample KL by the number of classes K as well (kept: the multipliers were tuned
    with it). Defaults: their ShuffleNetV2 configuration (experiments/base_experiments/base_shufflenetv2/
    params.json: reg_temperature 10, multiplier 1, reg_alpha 0.95 -> weight 0.95, CE 0.05), the
    smallest of their three students (ResNet-18: T 20 / multiplier 100 / alpha 0.1; MobileNetV2:
    T 40 / 1 / 0.95) and the closest to edgekd's few-ten-thousand-parameter CNN students.
    correct_prob 0.99 is fixed in their code. Needs no teacher.
    """

    correct_prob: float = bounded(0.99, lo=0, hi=1, lo_open=True, hi_open=True)
    temperature: float = kd_temperature(10.0)
    multiplier: float = nonnegative(1.0)
    needs_teacher = False
    weight = 0.95
    ce_weight = 0.05

    def virtual_teacher(self, labels: torch.Tensor, classes: int) -> torch.Tensor:
        """softmax(u / T), u the label's hand-made distribution, built on the labels' device."""
        u = torch.full((len(labels), classes), (1.0 - self.correct_prob) / (classes - 1), device=labels.device)
        u = u.scatter(1, labels.view(-1, 1), self.correct_prob)
        return F.softmax(u / self.temperature, dim=1)

    def forward(self, student_logits, teacher_logits, labels, feats=None):
        classes = student_logits.shape[1]
        q = self.virtual_teacher(labels, classes).to(student_logits.dtype)
        kl = (q * (q.log() - F.log_softmax(student_logits, dim=1))).sum(1).mean() / classes * self.multiplier
        return kl, {"tfkd": kl.item()}
