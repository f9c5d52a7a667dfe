"""Multi-process training on PyTorch's own distributed engine (torch.distributed + DDP).

``torchrun --nproc-per-node N -m edgekd distill ...`` starts N copies of the command; torchrun
sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in the environment, and
``init_from_env`` joins the process group (``gloo`` on CPU, ``nccl`` on CUDA). Then:

- every rank draws the same seeded permutation of the training set; each global batch of
  ``--batch-size`` is split across the ranks (rank r takes every N-th sample), so N processes
  see exactly the batches one process would, and a rank's loss is weighted by its share of the
  batch: DDP's gradient average is then the gradient of the global batch mean;
- the teacher's output cache is built in shards and gathered, so every rank holds all of it;
- train loss/accuracy and validation counts are summed over the ranks; batch-norm buffers are
  broadcast from rank 0 before validation, so every rank takes the same best-epoch decision;
- only rank 0 writes files (checkpoints, the run directory, the teacher), the others wait;
- with ``--device cuda`` each process trains on ``cuda:LOCAL_RANK`` (``resolve_device``); collectives
  run on the device the backend needs (``comm_device``: the process's GPU for nccl, the CPU for gloo),
  and tensors come back where they were;
- on CUDA the batch norms are SyncBatchNorm while a phase runs (``synced_batchnorm``), and are put
  back as the original BatchNorm modules, with the trained statistics, when it ends.

Without WORLD_SIZE (or with 1) everything here is a no-op and training is single-process.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..core.errors import ConfigError, EdgekdError


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched_rank() -> int:
    """The rank torchrun gave this process (0 when not launched by torchrun); unlike ``rank()``
    it still holds after the process group has been shut down (the CLI reports from rank 0)."""
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """Whether torchrun started this process as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(device: str) -> torch.device:
    """The device this process trains on. Under torchrun ``cuda`` (or ``cuda:0``) means
    ``cuda:LOCAL_RANK``, one GPU per process; another index is an error (every rank would land on
    that one GPU): choose the GPUs with CUDA_VISIBLE_DEVICES instead. Without torchrun, as given."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"unknown device {device!r}", "use --device cpu or --device cuda[:N]") from None
    if dev.type != "cuda" or not launched():
        return dev
    if dev.index not in (None, 0):
        raise ConfigError(f"--device {device} under torchrun: each process trains on the GPU of its LOCAL_RANK "
                          "(cuda:0 for local rank 0, cuda:1 for local rank 1, ...), so a fixed index would put "
                          "every process on one GPU",
                          "pass --device cuda, and pick the GPUs with CUDA_VISIBLE_DEVICES=N,M torchrun ...")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes in the environment. True when this call joined
    it (the caller then calls ``shutdown``); False when not launched by torchrun or already joined."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise EdgekdError("this PyTorch build has no torch.distributed", "run with a single process")
    dev = resolve_device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"this process has LOCAL_RANK {dev.index}, but this node has {torch.cuda.device_count()} "
                              "visible GPU(s): one process per GPU",
                              f"launch at most {torch.cuda.device_count()} processes per node (--nproc-per-node)")
        torch.cuda.set_device(dev)
    try:
        dist.init_process_group(backend=backend)
    except (RuntimeError, ValueError) as e:
        raise EdgekdError(f"cannot join the {backend} process group: {str(e).splitlines()[0][:160]}",
                          "launch with 'torchrun --nproc-per-node N -m edgekd distill ...'") from None
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_threads() -> int:
    """CPU threads per process: OMP_NUM_THREADS when set (PyTorch's own convention), else the cores
    shared among the processes of this node."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (os.cpu_count() or 1) // max(1, local))


def barrier() -> None:
    if world() > 1:
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. trains and saves the teacher); the others then run it
    and find its result on disk."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This rank's part of a global batch of sample indices (every world()-th, from rank())."""
    return idx[rank()::world()] if world() > 1 else idx


COMM_DEVICES = {"nccl": "cuda"}  # process-group backend -> the device kind its collectives take tensors on
COMM_DEFAULT = "cpu"  # any other backend (gloo)


def comm_device(backend: str | None = None) -> torch.device:
    """Where a collective's tensors must live (``COMM_DEVICES``): this process's GPU for nccl (it
    takes CUDA tensors only), the CPU otherwise (gloo). ``backend``: the process group's when not given."""
    kind = COMM_DEVICES.get(str(backend or dist.get_backend()), COMM_DEFAULT)
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, getattr(torch, kind).current_device())


def all_sum(*values: float) -> list[float]:
    """Element-wise sum over the ranks (float64: exact counts)."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def any_flag(*flags: bool) -> list[bool]:
    """Per position, whether any rank raised the flag (used to stop every rank at the same step)."""
    return [v > 0 for v in all_sum(*(float(bool(f)) for f in flags))]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank."""
    if world() > 1:
        where = comm_device()
        for b in module.buffers():
            if b.device == where:
                dist.broadcast(b.data, src=0)
            else:  # e.g. a model on the CPU under nccl: through the process's GPU and back
                moved = b.data.to(where)
                dist.broadcast(moved, src=0)
                b.data.copy_(moved)


def gather_rows(t: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate each rank's rows (rank r holds rows r*k..(r+1)*k of ``total``, the last fewer).
    The gather runs on ``comm_device()`` (the GPU under nccl); the result is on ``t``'s device."""
    if world() == 1:
        return t
    per = -(-total // world())
    padded = torch.zeros((per, *t.shape[1:]), dtype=t.dtype, device=comm_device())
    padded[: len(t)] = t.to(padded.device)
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:total].to(t.device)


def row_range(total: int) -> tuple[int, int]:
    """The contiguous rows this rank computes in ``gather_rows``."""
    per = -(-total // world())
    start = min(total, rank() * per)
    return start, min(total, start + per)


def sync_batchnorm(device: torch.device) -> bool:
    """Whether a phase on ``device`` syncs its batch norms across the ranks (SyncBatchNorm runs on
    GPUs only; on the CPU each rank normalises its own shard)."""
    return device.type == "cuda"


@contextmanager
def synced_batchnorm(module: torch.nn.Module):
    """Within the block, every BatchNorm under ``module`` is replaced by a SyncBatchNorm sharing its
    parameters and statistics; at exit (also on an error) the original BatchNorm modules are put
    back, holding the SyncBatchNorms' current parameters, statistics and train/eval mode, so that
    what is saved, quantized and exported after the phase is the model's own architecture."""
    swapped, made = [], {}  # made: one SyncBatchNorm per BatchNorm, also when a module is shared
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and \
                    not isinstance(child, torch.nn.SyncBatchNorm):
                if id(child) not in made:
                    made[id(child)] = torch.nn.SyncBatchNorm.convert_sync_batchnorm(child)
                synced = made[id(child)]
                setattr(parent, name, synced)
                swapped.append((parent, name, child, synced))
    try:
        yield module
    finally:
        for parent, name, original, synced in reversed(swapped):
            for key, value in (*synced.named_parameters(recurse=False), *synced.named_buffers(recurse=False)):
                setattr(original, key, value)
            original.train(synced.training)
            setattr(parent, name, original)
