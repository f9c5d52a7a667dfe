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


def fit(model: nn.Module, data: Dataset, cfg: FitConfig, loss_fn: LossFn,
        teacher: nn.Module | None = None, on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train ``model`` with ``loss_fn(student_logits, teacher_logits, labels)``; keep the best state."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = as_tensors(data.train)
    steps = math.ceil(len(x) / cfg.batch_size)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps, pct_start=0.15)
    if teacher is not None:
        teacher.eval()
    best, best_state, history, start = -1.0, None, [], time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        bar = tqdm(total=steps, desc=f"{cfg.desc} {epoch}/{cfg.epochs}", disable=not cfg.progress or not sys.stderr.isatty(),
                   leave=False, dynamic_ncols=True)
        seen = correct = 0
        loss_sum = 0.0
        for idx in _batches(len(x), cfg.batch_size, gen):
            xb, yb = x[idx], y[idx]
            if cfg.flip:
                xb = _augment(xb, gen)
            with torch.no_grad():
                t_logits = teacher(xb) if teacher is not None else None
            logits = model(xb)
            loss, parts = loss_fn(logits, t_logits, yb)
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
