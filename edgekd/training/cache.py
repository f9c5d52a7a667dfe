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
    computed once in eval mode and stored in float16, indexed by sample index. With random flips
    it holds both orientations (``flipped``), and each sample's entry follows its flip."""

    def __init__(self, logits: torch.Tensor, feats: dict[str, torch.Tensor], flipped: "TeacherCache | None" = None):
        self.logits, self.feats, self.flipped = logits, feats, flipped

    def get(self, idx: torch.Tensor, flipped: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        logits, feats = self.logits[idx].float(), {k: v[idx].float() for k, v in self.feats.items()}
        if flipped is not None and self.flipped is not None and bool(flipped.any()):
            other_logits, other_feats = self.flipped.get(idx[flipped])
            logits[flipped] = other_logits
            for k in feats:
                feats[k][flipped] = other_feats[k]
        return logits, feats

    @property
    def nbytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in (self.logits, *self.feats.values()))
        return own + (self.flipped.nbytes if self.flipped is not None else 0)


def cache_off_reason(flip: bool, teacher, layers=(), x=None, limit_mb: float = 2048, crop: bool = False) -> str | None:
    """Why the teacher's outputs cannot be cached, or None when they can. Flips double the cache
    (both orientations); random crops change the inputs every epoch, so they turn it off."""
    if teacher is None:
        return "no teacher"
    if crop:
        return ("random resized crops change the teacher's inputs every epoch; the teacher runs on every batch "
                "(pass --augment flip to cache its outputs)")
    if x is not None and layers:
        head = x[:2] if isinstance(x, torch.Tensor) else torch.from_numpy(x.take(range(min(2, len(x)))))
        shapes = {n: s for n, _, s in run_order(teacher, head)}
        mb = len(x) * 2 * (1 + bool(flip)) * sum(math.prod(shapes[n]) for n in layers if n in shapes) / 2**20
        if mb > limit_mb:
            return f"the teacher features would take {mb:.0f} MB in float16 (limit {limit_mb:.0f} MB)"
    return None


def _rows(x, lo: int, hi: int, batch_size: int, flip: bool):
    """Images ``lo:hi`` of ``x`` (a tensor or a split, eval transform) in batches, mirrored if ``flip``."""
    for i in range(lo, hi, batch_size):
        j = min(hi, i + batch_size)
        xb = x[i:j] if isinstance(x, torch.Tensor) else torch.from_numpy(x.take(range(i, j)))
        yield xb.flip(-1) if flip else xb


@torch.no_grad()
def build_teacher_cache(teacher: nn.Module, x, layers=(), batch_size: int = 512, flips: bool = False) -> TeacherCache:
    """The cache of ``teacher`` on ``x`` (a tensor of images, or a split); ``flips``: also on the mirrored
    images. Under torchrun each rank computes a contiguous slice of the rows and the slices are gathered."""
    teacher.eval()
    device = device_of(teacher)
    lo, hi = dd.row_range(len(x))
    logits, feats = [], {n: [] for n in layers if n != LOGITS}
    with FeatureHooks(teacher, layers, "teacher") as hooks:
        for xb in _rows(x, lo, hi, batch_size, flip=False):
            logits.append(teacher(xb.to(device)).half().cpu())
            for k, v in hooks.take().items():
                feats[k].append(v.half().cpu())
        if not logits:  # more ranks than rows
            probe = teacher(next(_rows(x, 0, 1, 1, False)).to(device))
            logits = [probe[:0].half().cpu()]
            feats = {k: [v[:0].half().cpu()] for k, v in hooks.take().items()} if feats else feats
    mirrored = None
    if flips:
        mirrored = build_teacher_cache(teacher, _Mirrored(x), layers, batch_size) if not isinstance(x, torch.Tensor) \
            else build_teacher_cache(teacher, x.flip(-1), layers, batch_size)
    return TeacherCache(dd.gather_rows(torch.cat(logits), len(x)),
                        {k: dd.gather_rows(torch.cat(v), len(x)) for k, v in feats.items()}, mirrored)


class _Mirrored:
    """A split seen in a mirror: ``take`` returns its images flipped left-right."""

    def __init__(self, split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def take(self, idx):
        return self.split.take(idx)[..., ::-1].copy()


def teacher_cache(teacher, x, flip: bool, layers=(), log: Log | None = None, crop: bool = False) -> TeacherCache | None:
    """A cache when the teacher's inputs are known in advance (also under random flips: both
    orientations are stored); otherwise None, and a log line says why."""
    reason = cache_off_reason(flip, teacher, layers, x, crop=crop)
    if reason:
        if log and teacher is not None:
            log(f"teacher cache off: {reason}")
        return None
    start = time.perf_counter()
    cache = build_teacher_cache(teacher, x, layers, flips=flip)
    if log:
        log(f"teacher cache: {len(x)} samples{' in both orientations' if flip else ''}, {1 + len(cache.feats)} "
            f"tensors, {cache.nbytes / 2**20:.1f} MB float16, built in {time.perf_counter() - start:.1f}s")
    return cache
