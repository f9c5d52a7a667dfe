"""Evaluation of a model on a split held in memory: batched logits and top-1 accuracy."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data import Split
from . import distributed as dd


def as_tensors(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(split.x), torch.from_numpy(split.y)


def device_of(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` in eval mode, batched, on the model's device; returned on the CPU."""
    model.eval()
    device = device_of(model)
    return torch.cat([model(x[i: i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, split: Split, sharded: bool = False) -> float:
    """Top-1 accuracy on a split; ``sharded``: under torchrun each rank scores every N-th sample
    and the counts are summed (the same value on every rank)."""
    x, y = as_tensors(split)
    if sharded and dd.world() > 1:
        x, y = x[dd.rank()::dd.world()], y[dd.rank()::dd.world()]
        correct, n = dd.all_sum(float((predict(model, x).argmax(1) == y).sum()) if len(x) else 0.0, float(len(x)))
        return correct / n
    return float((predict(model, x).argmax(1) == y).float().mean())


def logits_agree(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and max absolute difference between two logit arrays."""
    return float((a.argmax(1) == b.argmax(1)).mean()), float(np.abs(a - b).max())
