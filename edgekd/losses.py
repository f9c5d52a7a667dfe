"""Knowledge-distillation losses, registered by name.

Every loss takes ``(student_logits, teacher_logits, labels)`` and returns the scalar total and a
dict of its named parts (floats, for logging). ``teacher_logits`` is None for losses that need
no teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .registry import Registry

LOSSES: Registry = Registry("distillation method")


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
@dataclass
class HintonKD:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels).

    Defaults follow common practice for Hinton KD on small image datasets (T=4, alpha=0.9).
    """

    temperature: float = 4.0
    alpha: float = 0.9
    needs_teacher = True

    def __post_init__(self):
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")

    def __call__(self, student_logits, teacher_logits, labels):
        kd = kd_divergence(student_logits, teacher_logits, self.temperature)
        ce = F.cross_entropy(student_logits, labels)
        total = self.alpha * kd + (1.0 - self.alpha) * ce
        return total, {"kd": kd.item(), "ce": ce.item()}


@LOSSES.register("none")
@dataclass
class CrossEntropyOnly:
    """No distillation: cross-entropy on the labels (the QAT-only baseline)."""

    needs_teacher = False

    def __call__(self, student_logits, teacher_logits, labels):
        ce = F.cross_entropy(student_logits, labels)
        return ce, {"ce": ce.item()}


def make_loss(method: str, **params):
    """Build a registered loss; unknown parameters fail with the accepted ones listed."""
    cls = LOSSES.get(method)
    fields = getattr(cls, "__dataclass_fields__", {})
    bad = [k for k in params if k not in fields]
    if bad:
        from .registry import suggest

        raise ConfigError(f"method {method!r} has no parameter {bad[0]!r}{suggest(bad[0], list(fields))}",
                          f"its parameters: {', '.join(fields) or 'none'}")
    return cls(**params)
