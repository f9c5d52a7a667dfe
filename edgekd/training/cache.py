"""The teacher-output cache: the teacher's logits (and the features the objective names) computed once
per training sample and reused by every epoch, when the input pipeline is deterministic."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn

from ..kd.features import LOGITS, FeatureHooks, run_order
from . import distributed as dd
from .evaluate import device_of

Log = Callable[[str], None]


class TeacherCache:
    """The teacher's logits (and the features the objective names) for every training sample,
    computed once in eval mode and stored in float16, indexed by sample index."""

    def __init__(self, logits: torch.Tensor, feats: dict[str, torch.Tensor]):
        self.logits, self.feats = logits, feats

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.logits[idx].float(), {k: v[idx].float() for k, v in self.feats.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.logits, *self.feats.values()))


def cache_off_reason(flip: bool, teacher, layers=(), x: torch.Tensor | None = None,
                     limit_mb: float = 2048) -> str | None:
    """Why the teacher's outputs cannot be cached, or None when they can."""

    if teacher is None:
        return "no teacher"
    if flip:
        return ("random flip augmentation changes the teacher's inputs every epoch; the teacher runs on every batch "
                "(pass --no-flip to cache its outputs)")
    if x is not None and layers:
        shapes = {n: s for n, _, s in run_order(teacher, x[:2])}
        mb = len(x) * 2 * sum(math.prod(shapes[n]) for n in layers if n in shapes) / 2**20
        if mb > limit_mb:
            return f"the teacher features would take {mb:.0f} MB in float16 (limit {limit_mb:.0f} MB)"
    return None


@torch.no_grad()
def build_teacher_cache(teacher: nn.Module, x: torch.Tensor, layers=(), batch_size: int = 512) -> TeacherCache:
    """Under torchrun each rank computes a contiguous slice of the rows and the slices are gathered."""
    teacher.eval()
    device = device_of(teacher)
    lo, hi = dd.row_range(len(x))
    logits, feats = [], {n: [] for n in layers if n != LOGITS}
    with FeatureHooks(teacher, layers, "teacher") as hooks:
        for i in range(lo, hi, batch_size):
            logits.append(teacher(x[i: min(hi, i + batch_size)].to(device)).half().cpu())
            for k, v in hooks.take().items():
                feats[k].append(v.half().cpu())
    if not logits:  # more ranks than rows
        probe = teacher(x[:1].to(device))
        logits = [probe[:0].half().cpu()]
        feats = {k: [v[:0].half().cpu()] for k, v in hooks.take().items()} if feats else feats
    return TeacherCache(dd.gather_rows(torch.cat(logits), len(x)),
                        {k: dd.gather_rows(torch.cat(v), len(x)) for k, v in feats.items()})


def teacher_cache(teacher, x: torch.Tensor, flip: bool, layers=(), log: Log | None = None) -> TeacherCache | None:
    """A cache when the input pipeline is deterministic; otherwise None, and a log line says why."""
    reason = cache_off_reason(flip, teacher, layers, x)
    if reason:
        if log and teacher is not None:
            log(f"teacher cache off: {reason}")
        return None
    start = time.perf_counter()
    cache = build_teacher_cache(teacher, x, layers)
    if log:
        log(f"teacher cache: {len(x)} samples, {1 + len(cache.feats)} tensors, {cache.nbytes / 2**20:.1f} MB float16, "
            f"built in {time.perf_counter() - start:.1f}s")
    return cache
