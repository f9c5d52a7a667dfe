"""Where a training phase's batches come from: a split held in memory, a decoded-image cache, or files decoded lazily.

Each gives, for an epoch's seeded sample order, the global batches from a given step on, each as
(sample indices, images, labels, flipped) on the training device, already cut to this process's
share under torchrun (every rank draws the same global batch and takes every N-th sample).

- ``MemoryBatches`` (digits, Fashion-MNIST, npz): indexing tensors; random horizontal flips drawn
  from the phase's generator, one draw per global batch, exactly as before lazy data existed, so
  resumed runs stay bit-exact.
- ``CachedBatches`` (image folders with their decoded-image cache, no random crops): as
  ``MemoryBatches``, each batch gathered from the memory map and normalized.
- ``LoaderBatches`` (image folders otherwise): a torch DataLoader with worker processes decodes the images;
  random crops and flips draw from a generator seeded by (seed, epoch, sample index), so a sample
  looks the same whatever the number of workers, and a resumed run sees the same pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.errors import WorkerFailure
from . import distributed as dd


def batches_for(split, batch_size: int, flip: bool, seed: int, workers: int = 0):
    """The batch source for ``split`` (lazy splits have ``lazy = True``; an image folder's split whose
    decoded-image cache is ready and which takes no random crops is read like arrays in memory)."""
    if getattr(split, "lazy", False):
        if hasattr(split, "prepare") and split.prepare() and not split.crops:
            return CachedBatches(split, batch_size, flip)
        return LoaderBatches(split, batch_size, flip, seed, workers)
    return MemoryBatches(split, batch_size, flip)


def flip_rows(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal flips, each sample with probability 1/2 (drawn from ``gen``); returns the
    images and which were flipped."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = x.clone()
    x[flip] = x[flip].flip(-1)
    return x, flip


class MemoryBatches:
    def __init__(self, split, batch_size: int, flip: bool):
        self.x, self.y = torch.from_numpy(split.x), torch.from_numpy(split.y)
        self.source = self.x  # what the teacher cache is computed on
        self.batch_size, self.flip = batch_size, flip
        self.steps = math.ceil(len(self.y) / batch_size)

    def __len__(self) -> int:
        return len(self.y)

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` training images (un-augmented): probes and shapes."""
        return self.x[:n]

    def images(self, batch: torch.Tensor) -> torch.Tensor:
        return self.x[batch]

    def readable(self, batch: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """The positions in ``local`` whose samples can be read (in memory: all)."""
        return local

    def epoch(self, order: torch.Tensor, start: int, epoch: int, gen: torch.Generator, device):
        for step in range(start, self.steps):
            batch = order[step * self.batch_size: (step + 1) * self.batch_size]
            xb = self.images(batch)
            xb, flipped = flip_rows(xb, gen) if self.flip else (xb, None)
            local = dd.shard(torch.arange(len(batch)))
            share = len(local) * dd.world() / len(batch)  # DDP averages: weight by this rank's share
            local = self.readable(batch, local)
            if not len(local):
                continue
            flipped = flipped[local] if flipped is not None else None
            yield batch[local], xb[local].to(device), self.y[batch[local]].to(device), flipped, share


class CachedBatches(MemoryBatches):
    """An image folder's split read from its decoded-image cache (data.decoded): each batch gathered
    from the memory map and normalized in this process, flips drawn as for arrays in memory; the
    samples of unreadable files (--skip-bad-images) are left out."""

    def __init__(self, split, batch_size: int, flip: bool):
        self.split, self.source = split, split
        self.y = torch.from_numpy(split.y)
        self.ok = torch.from_numpy(split.readable(np.arange(len(split))))
        self.batch_size, self.flip = batch_size, flip
        self.steps = math.ceil(len(self.y) / batch_size)

    def head(self, n: int) -> torch.Tensor:
        return torch.from_numpy(self.split.take(range(min(n, len(self.split)))))

    def images(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.split.take(batch.numpy()))

    def readable(self, batch: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return local[self.ok[batch[local]]]


class _Samples(torch.utils.data.Dataset):
    """Sample i of a lazy split through its training transform (random crops) and a random flip, both
    drawn from a generator seeded by (seed, epoch, i)."""

    def __init__(self, split, seed: int, epoch: int, flip: bool):
        self.split, self.seed, self.epoch, self.flip = split, seed, epoch, flip

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        image = WorkerFailure.catching(lambda: self.split.load(i, rng if self.split.crops else None))
        if isinstance(image, WorkerFailure):
            return i, image, 0, False
        flipped = bool(self.flip and rng.random() < 0.5)
        if image is not None and flipped:
            image = np.ascontiguousarray(image[:, :, ::-1])
        return i, image, int(self.split.y[i]), flipped


def _collate(items):
    """(a batch of (index, image, label, flipped), the indices of skipped bad files): images a bad file
    skipped (None) are dropped, and their indices sent back, since a worker process cannot record them."""
    failed = next((it[1] for it in items if isinstance(it[1], WorkerFailure)), None)
    if failed is not None:
        return failed, []
    kept = [it for it in items if it[1] is not None]
    bad = [it[0] for it in items if it[1] is None]
    if not kept:
        return None, bad
    return (torch.tensor([it[0] for it in kept]), torch.from_numpy(np.stack([it[1] for it in kept])),
            torch.tensor([it[2] for it in kept]), torch.tensor([it[3] for it in kept])), bad


class LoaderBatches:
    def __init__(self, split, batch_size: int, flip: bool, seed: int, workers: int):
        self.split, self.batch_size, self.flip, self.seed = split, batch_size, flip, seed
        self.source, self.workers = split, workers
        self.y = torch.from_numpy(split.y)
        self.steps = math.ceil(len(self.y) / batch_size)

    def __len__(self) -> int:
        return len(self.y)

    def head(self, n: int) -> torch.Tensor:
        return torch.from_numpy(self.split.take(range(min(n, len(self.split)))))

    def epoch(self, order: torch.Tensor, start: int, epoch: int, gen: torch.Generator, device):
        batches = []
        for step in range(start, self.steps):
            batch = order[step * self.batch_size: (step + 1) * self.batch_size]
            local = dd.shard(torch.arange(len(batch)))
            batches.append((batch[local].tolist(), len(local) * dd.world() / len(batch)))
        loader = torch.utils.data.DataLoader(_Samples(self.split, self.seed, epoch, self.flip),
                                             batch_sampler=[b for b, _ in batches], num_workers=self.workers,
                                             collate_fn=_collate, persistent_workers=False)
        for (_, share), (item, bad) in zip(batches, loader):
            for i in bad:  # recorded here, in the main process (data.imagefolder.FolderSplit.bad)
                self.split.bad.add(self.split.files[i])
            if isinstance(item, WorkerFailure):
                item.raise_()
            if item is None:
                continue
            idx, xb, yb, flipped = item
            yield idx, xb.to(device), yb.to(device), flipped, share
