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
- only rank 0 writes files (checkpoints, the run directory, the teacher), the others wait.

Without WORLD_SIZE (or with 1) everything here is a no-op and training is single-process.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..core.errors import EdgekdError


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


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes in the environment. True when this call joined
    it (the caller then calls ``shutdown``); False when not launched by torchrun or already joined."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise EdgekdError("this PyTorch build has no torch.distributed", "run with a single process")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
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


def all_sum(*values: float) -> list[float]:
    """Element-wise sum over the ranks (float64 on the CPU: gloo and exact counts)."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def any_flag(*flags: bool) -> list[bool]:
    """Per position, whether any rank raised the flag (used to stop every rank at the same step)."""
    return [v > 0 for v in all_sum(*(float(bool(f)) for f in flags))]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank."""
    if world() > 1:
        for b in module.buffers():
            dist.broadcast(b.data, src=0)


def gather_rows(t: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate each rank's rows (rank r holds rows r*k..(r+1)*k of ``total``, the last fewer)."""
    if world() == 1:
        return t
    per = -(-total // world())
    padded = torch.zeros((per, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:total]


def row_range(total: int) -> tuple[int, int]:
    """The contiguous rows this rank computes in ``gather_rows``."""
    per = -(-total // world())
    start = min(total, rank() * per)
    return start, min(total, start + per)
