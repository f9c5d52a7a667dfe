"""Relation-based distillation: terms on relations between samples or layers (rkd, fsp)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError
from .feature import _FeatureTerm, common_size
from .objective import LOSSES, _f, bounded, nonnegative


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
@dataclass(eq=False)
class RelationalKD(_FeatureTerm):
    """Park et al. 2019 (RKD): distance_weight * RKD-D + angle_weight * RKD-A on an embedding.

    Paper defaults: distance 25, angle 50. Default layer: the penultimate embedding (the last
    flat output before the classifier) of each network; name ``logits`` to use the logits.
    """

    distance_weight: float = nonnegative(25.0)
    angle_weight: float = nonnegative(50.0)
    auto = "embedding"

    def forward(self, student_logits, teacher_logits, labels, feats=None):
        dist = ang = 0.0
        for s, t in self.pairs(feats):
            dist, ang = dist + rkd_distance(s, t), ang + rkd_angle(s, t)
        return self.distance_weight * dist + self.angle_weight * ang, {"rkd_d": _f(dist), "rkd_a": _f(ang)}


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Yim et al. 2017: G = a^T b / (H W) between two maps (height and width of the larger pooled
    separately to the smaller). RepDistiller's ``FSP.compute_fsp`` builds the transpose, (b a^T) / HW:
    the same squared differences."""
    a, b = common_size(a, b)
    a, b = a.flatten(2), b.flatten(2)
    return torch.bmm(a, b.transpose(1, 2)) / a.shape[-1]


@LOSSES.register("fsp")
@dataclass(eq=False)
class FlowOfSolution(_FeatureTerm):
    """Yim et al. 2017 (FSP): mean squared difference between student and teacher Gram matrices of
    consecutive layer pairs (l1, l2), (l2, l3), ..., summed over the pairs (RepDistiller
    distiller_zoo/FSP.py, ``sum(loss_group)`` in helper/pretrain.py ``init``).

    A first stage, as in the paper (stage 1: the FSP loss alone; stage 2: the task) and RepDistiller
    (``init``, 30 ``init_epochs`` before 240 epochs of CE, the FSP term then dropped): training.schemes
    trains the float student with this term alone for ``stage`` x the run's training epochs (float +
    QAT; 30/240 = 0.125, rounded, at least 1 epoch) before those epochs, then trains them without it.
    Student maps whose channels differ from the teacher's pass a learned 1x1 conv (RepDistiller
    requires equal channels). Default layers: for each resolution both networks share, the last output
    at it (at least 2). Used directly in a training loop (no scheme), the term is trained jointly.
    """

    stage: float = bounded(0.125, lo=0, lo_open=True, hi=10)  # a fraction of the run's training epochs
    first_stage = True

    def stage_epochs(self, epochs: int) -> int:
        """The first stage's length for a run of ``epochs`` training epochs."""
        return max(1, round(self.stage * epochs))

    def build_adapters(self, probe):
        from .features import adapter

        return [adapter(probe.student_shape(s), probe.teacher_shape(t), spatial=False)
                for s, t in zip(self.student, self.teacher)]

    def forward(self, student_logits, teacher_logits, labels, feats=None):
        maps = [(a(s), t) for a, (s, t) in zip(self.adapters, self.pairs(feats))]
        if len(maps) < 2:
            raise ConfigError("fsp needs at least two layer pairs", "name two or more layers in 'student' and 'teacher'")
        loss = sum((fsp_matrix(s1, s2) - fsp_matrix(t1, t2)).pow(2).mean()
                   for (s1, t1), (s2, t2) in zip(maps, maps[1:]))
        return loss, {"fsp": _f(loss)}
