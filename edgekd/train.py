"""Training loops: the float teacher, and the student under distillation + QAT.

Data is held in memory as tensors and batched by a seeded permutation (fast on small images,
and the same order on every machine for a given seed). Each epoch ends with validation; the
state with the best validation accuracy is kept.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset, Split


@dataclass
class FitConfig:
    epochs: int = 10
    lr: float = 2e-3
    batch_size: int = 128
    weight_decay: float = 5e-4
    seed: int = 0
    flip: bool = False  # random horizontal flips of training images
    progress: bool = True
    desc: str = "train"
    log: Callable[[str], None] | None = None  # info lines (e.g. why the teacher cache is off)


@dataclass
class FitResult:
    best_val_accuracy: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def as_tensors(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(split.x), torch.from_numpy(split.y)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` in eval mode, batched."""
    model.eval()
    return torch.cat([model(x[i: i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, split: Split) -> float:
    x, y = as_tensors(split)
    return float((predict(model, x).argmax(1) == y).float().mean())


def _batches(n: int, batch_size: int, gen: torch.Generator):
    order = torch.randperm(n, generator=gen)
    for i in range(0, n, batch_size):
        yield order[i: i + batch_size]


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = x.clone()
    x[flip] = x[flip].flip(-1)
    return x


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: not on biases, norms, or quantizer scales."""
    from .quant import is_quantizer_param

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or is_quantizer_param(name) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
Log = Callable[[str], None]


# ---- teacher-output cache ------------------------------------------------------------------------

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
    from .features import run_order

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
    from .features import LOGITS, FeatureHooks

    teacher.eval()
    logits, feats = [], {n: [] for n in layers if n != LOGITS}
    with FeatureHooks(teacher, layers, "teacher") as hooks:
        for i in range(0, len(x), batch_size):
            logits.append(teacher(x[i: i + batch_size]).half())
            for k, v in hooks.take().items():
                feats[k].append(v.half())
    return TeacherCache(torch.cat(logits), {k: torch.cat(v) for k, v in feats.items()})


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


# ---- the loop ------------------------------------------------------------------------------------

def _call_loss(loss_fn, logits, t_logits, labels, feats):
    """New-style objectives take the captured features; plain (s, t, y) callables still work."""
    if getattr(loss_fn, "wants_layers", False) or isinstance(loss_fn, _objective_types()):
        return loss_fn(logits, t_logits, labels, feats)
    return loss_fn(logits, t_logits, labels)


def _objective_types():
    from .losses import Objective, Term

    return (Objective, Term)


def _mutual_loss(peer_logits: list[torch.Tensor], logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DML (Zhang et al. 2018) for the peers: CE + KL(mean of the other networks || peer) at T=1."""
    from .losses import kd_divergence

    everyone = [logits.detach()] + [p.detach() for p in peer_logits]
    loss = 0.0
    for i, p in enumerate(peer_logits):
        others = torch.stack([e for j, e in enumerate(everyone) if j != i + 1]).mean(0)
        loss = loss + F.cross_entropy(p, labels) + kd_divergence(p, others, 1.0)
    return loss


def _setup_objective(loss_fn, model, teacher, x) -> None:
    if getattr(loss_fn, "needs_setup", False):
        from .features import Probe

        loss_fn.setup(Probe(model, teacher, x[: min(len(x), 8)]))


def fit(model: nn.Module, data: Dataset, cfg: FitConfig, loss_fn: LossFn,
        teacher: nn.Module | None = None, on_epoch: Callable[[dict], None] | None = None, *,
        peers: list[nn.Module] | None = None, cache: TeacherCache | bool | None = None) -> FitResult:
    """Train ``model`` with ``loss_fn(student_logits, teacher_logits, labels[, feats])``; keep the best state.

    ``loss_fn`` is a losses.Objective (or any callable of the three tensors). Its learned adapters
    are trained with the model. ``peers`` are trained alongside (online mutual learning): the
    model's "teacher logits" are then the peers' mean output. ``cache``: a TeacherCache to reuse,
    True/None to build one when the pipeline is deterministic (``cfg.flip`` off), False for none.
    """
    from tqdm import tqdm

    from .features import LOGITS, FeatureHooks, Feats

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = as_tensors(data.train)
    steps = math.ceil(len(x) / cfg.batch_size)
    peers = list(peers or [])
    if teacher is not None:
        teacher.eval()
    _setup_objective(loss_fn, model, teacher, x)
    s_layers, t_layers = getattr(loss_fn, "student_layers", ()), getattr(loss_fn, "teacher_layers", ())
    if cache is None or cache is True:
        cache = teacher_cache(teacher, x, cfg.flip, t_layers, cfg.log)
    groups = _param_groups(model, cfg.weight_decay) + [g for p in peers for g in _param_groups(p, cfg.weight_decay)]
    extra = list(getattr(loss_fn, "parameters", lambda: [])())
    groups += [{"params": extra, "weight_decay": 0.0}] if extra else []
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps, pct_start=0.15)
    s_hooks = FeatureHooks(model, s_layers, "student")
    t_hooks = FeatureHooks(teacher if not cache else None, t_layers, "teacher")
    best, best_state, history, start = -1.0, None, [], time.perf_counter()
    try:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            for p in peers:
                p.train()
            bar = tqdm(total=steps, desc=f"{cfg.desc} {epoch}/{cfg.epochs}", disable=not cfg.progress or not sys.stderr.isatty(),
                       leave=False, dynamic_ncols=True)
            seen = correct = 0
            loss_sum = 0.0
            for idx in _batches(len(x), cfg.batch_size, gen):
                xb, yb = x[idx], y[idx]
                if cfg.flip:
                    xb = _augment(xb, gen)
                feats = Feats()
                if cache:
                    t_logits, feats.teacher = cache.get(idx)
                elif teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(xb)
                    feats.teacher = t_hooks.take()
                else:
                    t_logits = None
                logits = model(xb)
                feats.student = s_hooks.take()
                peer_logits = [p(xb) for p in peers]
                if peers:
                    t_logits = torch.stack(peer_logits).mean(0).detach()
                feats.student[LOGITS], feats.teacher[LOGITS] = logits, t_logits
                loss, parts = _call_loss(loss_fn, logits, t_logits, yb, feats)
                if peers:
                    loss = loss + _mutual_loss(peer_logits, logits, yb)
                if not torch.isfinite(loss):
                    from .errors import EdgekdError

                    raise EdgekdError(f"the loss became {loss.item()} at epoch {epoch}",
                                      "lower --lr; the last good checkpoint is kept")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                seen += len(yb)
                correct += int((logits.argmax(1) == yb).sum())
                loss_sum += loss.item() * len(yb)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
                bar.update()
            bar.close()
            val = accuracy(model, data.val)
            row = {"epoch": epoch, "loss": loss_sum / seen, "train_accuracy": correct / seen, "val_accuracy": val,
                   "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - start}
            history.append(row)
            if val > best:
                best, best_state = val, copy.deepcopy(model.state_dict())
                row["best"] = True
            if on_epoch:
                on_epoch(row)
    finally:
        s_hooks.remove()
        t_hooks.remove()
    model.load_state_dict(best_state)
    best_epoch = max(history, key=lambda r: r["val_accuracy"])["epoch"]
    return FitResult(best, best_epoch, history, time.perf_counter() - start)


def set_threads() -> None:
    """Use every core for intra-op parallelism (torch defaults to physical cores)."""
    import os

    torch.set_num_threads(max(1, os.cpu_count() or 1))


def logits_agree(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and max absolute difference between two logit arrays."""
    return float((a.argmax(1) == b.argmax(1)).mean()), float(np.abs(a - b).max())
