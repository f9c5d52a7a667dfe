"""Teacher ensembles: several teachers as one classifier, and how the training loop runs them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError


class Ensemble(nn.Module):
    """Several teachers as one (weights normalized to sum 1).

    Called, it is a classifier (its accuracy, a single output): ``mix="probs"`` (default) returns
    log(sum_i w_i softmax(z_i)), whose softmax is the average of the members' distributions;
    ``mix="logits"`` returns sum_i w_i z_i. To distill, the schemes run ``member_logits()`` instead and
    the objective reads the members as a kd.Teachers, so that every term that softens (hinton, kd, dkd)
    gets sum_i w_i softmax(z_i / T) at its own T: the average of the softened outputs, which
    log(mix at T = 1) / T is not once T > 1. Features come from the first teacher.
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

    def member_logits(self) -> "MemberLogits":
        return MemberLogits(self)


class MemberLogits(nn.Module):
    """An Ensemble as the training loop runs it: the members' logits stacked, (batch, members, classes),
    so that the teacher cache keeps them all and Objective.read_teachers mixes them per term."""

    def __init__(self, ensemble: Ensemble):
        super().__init__()
        self.ensemble = ensemble

    @property
    def feature_source(self) -> nn.Module:
        return self.ensemble.members[0]

    def forward(self, x):
        return torch.stack([m(x) for m in self.ensemble.members], dim=1)


def for_distillation(objective, teacher: nn.Module | None) -> nn.Module | None:
    """The teacher as the loop runs it for ``objective``: a probability-averaging ensemble hands over its
    members' logits (the objective learns their weights); any other teacher is itself."""
    objective.teacher_weights = None
    if isinstance(teacher, Ensemble) and teacher.mix == "probs":
        objective.teacher_weights = teacher.weights.detach().cpu().clone()
        return teacher.member_logits()
    return teacher
