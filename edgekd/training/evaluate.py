"""Evaluation of a model on a split: batched logits and top-1 accuracy, for a split held in memory
or one decoded lazily (an image folder's, through a DataLoader with the split's workers)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..core.errors import WorkerFailure
from . import distributed as dd


def as_tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    """A split held in memory as tensors (images, labels)."""
    return torch.from_numpy(split.x), torch.from_numpy(split.y)


def device_of(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


class _EvalSamples(torch.utils.data.Dataset):
    def __init__(self, split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return i, WorkerFailure.catching(lambda: self.split.load(i)), int(self.split.y[i])


def _collate(items):
    failed = next((it[1] for it in items if isinstance(it[1], WorkerFailure)), None)
    if failed is not None:
        return failed
    kept = [it for it in items if it[1] is not None]  # a bad image skipped (--skip-bad-images)
    if not kept:
        return None
    return (torch.tensor([i for i, _, _ in kept]), torch.from_numpy(np.stack([im for _, im, _ in kept])),
            torch.tensor([y for _, _, y in kept]))


def eval_batches(split, batch_size: int = 512) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of ``split`` through its eval transform, ``batch_size`` at a time, in order."""
    if not getattr(split, "lazy", False):
        x, y = as_tensors(split)
        for i in range(0, len(x), batch_size):
            yield x[i: i + batch_size], y[i: i + batch_size]
        return
    if hasattr(split, "prepare") and split.prepare():  # an image folder's decoded-image cache
        for i in range(0, len(split), batch_size):
            idx = np.arange(i, min(i + batch_size, len(split)))
            idx = idx[split.readable(idx)]
            if len(idx):
                yield torch.from_numpy(split.take(idx)), torch.from_numpy(split.y[idx])
        return
    loader = torch.utils.data.DataLoader(_EvalSamples(split), batch_size=batch_size, collate_fn=_collate,
                                         num_workers=getattr(split, "workers", 0))
    for item in loader:
        if isinstance(item, WorkerFailure):
            item.raise_()
        if item is not None:
            yield item[1], item[2]


@torch.no_grad()
def predict(model: nn.Module, x, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` in eval mode on the images ``x`` (a tensor, or a split), batched, on the
    model's device; returned on the CPU."""
    model.eval()
    device = device_of(model)
    if isinstance(x, torch.Tensor):
        chunks = (x[i: i + batch_size] for i in range(0, len(x), batch_size))
    else:
        chunks = (xb for xb, _ in eval_batches(x, batch_size))
    return torch.cat([model(xb.to(device)).float().cpu() for xb in chunks])


@torch.no_grad()
def accuracy(model: nn.Module, split, sharded: bool = False) -> float:
    """Top-1 accuracy on a split; ``sharded``: under torchrun each rank scores every N-th sample
    and the counts are summed (the same value on every rank)."""
    if sharded and dd.world() > 1:
        split = split.subset(np.arange(dd.rank(), len(split), dd.world()))
    model.eval()
    device = device_of(model)
    correct = seen = 0
    for xb, yb in eval_batches(split):
        correct += int((model(xb.to(device)).argmax(1).cpu() == yb).sum())
        seen += len(yb)
    if sharded and dd.world() > 1:
        correct, seen = dd.all_sum(float(correct), float(seen))
        return correct / seen
    return float(np.float32(correct) / np.float32(seen)) if seen else 0.0  # a float32 mean, as torch computes it


def logits_agree(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and max absolute difference between two logit arrays."""
    return float((a.argmax(1) == b.argmax(1)).mean()), float(np.abs(a - b).max())
