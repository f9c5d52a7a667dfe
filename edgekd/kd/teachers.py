"""Several networks' logits for one batch, as the loss terms read them: a multi-teacher ensemble
(``mix="probs"``) or the peers of deep mutual learning (``mix="each"``).

A term that takes teacher logits receives either one (batch, classes) tensor or a ``Teachers``. The
helpers below are what the terms call, so that every term reads a group the same way:
``soft_log_probs(t, T)`` is the teacher's distribution at the term's own temperature, ``logit_target(t)``
the logits a logit-matching term regresses, and ``summed_over(t, fn)`` applies a term once per network
of an ``each`` group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIXES = ("probs", "each")


class Teachers:
    """The logits of several networks for one batch, ``logits`` of shape (networks, batch, classes),
    a weight per network, and how a term reads them:

    - ``"probs"`` (a multi-teacher ensemble, training.schemes.Ensemble): the teacher distribution at
      temperature T is the weighted average of the members' softened outputs, sum_i w_i softmax(z_i / T),
      at each term's own T. A term on logits (mse) regresses the weighted mean of the members' logits.
    - ``"each"`` (deep mutual learning with several peers): a term is computed once per network and the
      results are summed with the weights (1 each: Zhang et al.'s code sums one KL per other network).
    """

    def __init__(self, logits: torch.Tensor, weights=None, mix: str = "probs"):
        if mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
        if logits.ndim != 3:
            raise ValueError(f"Teachers takes logits of shape (networks, batch, classes), got {tuple(logits.shape)}")
        n = logits.shape[0]
        weights = torch.full((n,), 1.0 / n) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape != (n,):
            raise ValueError(f"{n} networks need {n} weights, got shape {tuple(weights.shape)}")
        self.logits, self.weights, self.mix = logits, weights.to(logits.device), mix

    @classmethod
    def each(cls, logits: list[torch.Tensor]) -> "Teachers":
        """Peers whose losses are summed, one per network (weight 1 each)."""
        return cls(torch.stack(logits), torch.ones(len(logits)), "each")

    def log_probs(self, temperature: float) -> torch.Tensor:
        """log sum_i w_i softmax(z_i / T): the log of the mixture of the softened outputs."""
        log_p = F.log_softmax(self.logits.float() / temperature, dim=-1)
        return torch.logsumexp(log_p + self.weights.log().view(-1, 1, 1), dim=0)

    def mean_logits(self) -> torch.Tensor:
        w = self.weights / self.weights.sum()
        return (w.view(-1, 1, 1) * self.logits.float()).sum(0)

    def as_logits(self) -> torch.Tensor:
        """One (batch, classes) tensor for the group, where a term needs a single output (a feature term
        naming ``logits``): the ensemble's own output (its mixture at T = 1), or the peers' mean logits."""
        return self.log_probs(1.0) if self.mix == "probs" else self.mean_logits()


def is_each(teacher) -> bool:
    return isinstance(teacher, Teachers) and teacher.mix == "each"


def soft_log_probs(teacher, temperature: float) -> torch.Tensor:
    """The teacher's log-probabilities at ``temperature``: log_softmax(t / T) for one network, the log of
    the members' averaged softened outputs for an ensemble (not an ``each`` group: see summed_over)."""
    if isinstance(teacher, Teachers):
        if teacher.mix == "each":
            raise ValueError("an 'each' group is read one network at a time (kd.teachers.summed_over)")
        return teacher.log_probs(temperature)
    return F.log_softmax(teacher / temperature, dim=1)


def logit_target(teacher) -> torch.Tensor:
    """The logits a logit-matching term regresses: the tensor itself, or an ensemble's mean logits."""
    return teacher.mean_logits() if isinstance(teacher, Teachers) else teacher


def summed_over(teacher, fn):
    """``fn(teacher)``; for an ``each`` group the weighted sum of ``fn(z_i)`` over its networks
    (``fn`` may return a tensor or a tuple of tensors, summed element by element)."""
    if not is_each(teacher):
        return fn(teacher)
    outs = [fn(z) for z in teacher.logits]
    w = teacher.weights.to(teacher.logits.dtype)
    if isinstance(outs[0], tuple):
        return tuple(sum(wi * out[k] for wi, out in zip(w, outs)) for k in range(len(outs[0])))
    return sum(wi * out for wi, out in zip(w, outs))
