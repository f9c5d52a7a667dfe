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
    device: str = "cpu"  # "cuda" / "cuda:N": model, batches and the teacher on the GPU
    amp: bool = False  # bfloat16 autocast on CUDA (float phases only: QAT stays in float32)


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
    """Logits of ``model`` in eval mode, batched, on the model's device; returned on the CPU."""
    model.eval()
    device = _device_of(model)
    return torch.cat([model(x[i: i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, split: Split, sharded: bool = False) -> float:
    """Top-1 accuracy on a split; ``sharded``: under torchrun each rank scores every N-th sample
    and the counts are summed (the same value on every rank)."""
    from . import distributed as dd

    x, y = as_tensors(split)
    if sharded and dd.world() > 1:
        x, y = x[dd.rank()::dd.world()], y[dd.rank()::dd.world()]
        correct, n = dd.all_sum(float((predict(model, x).argmax(1) == y).sum()) if len(x) else 0.0, float(len(x)))
        return correct / n
    return float((predict(model, x).argmax(1) == y).float().mean())


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
    """Under torchrun each rank computes a contiguous slice of the rows and the slices are gathered."""
    from . import distributed as dd
    from .features import LOGITS, FeatureHooks

    teacher.eval()
    device = _device_of(teacher)
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


class _Step(nn.Module):
    """One training step's forward: student, peers and the objective (with its adapters) in one
    module, so that DistributedDataParallel averages the gradients of all of them."""

    def __init__(self, model: nn.Module, peers: list[nn.Module], loss_fn, extra: list[nn.Parameter]):
        super().__init__()
        self.model, self.peers, self.loss_fn = model, nn.ModuleList(peers), loss_fn
        self.extra = nn.ParameterList(extra)
        self.s_hooks = None

    def forward(self, xb, yb, t_logits, t_feats, weight: float):
        from .features import LOGITS, Feats

        feats = Feats()
        feats.teacher = t_feats
        logits = self.model(xb)
        feats.student = self.s_hooks.take()
        peer_logits = [p(xb) for p in self.peers]
        if self.peers:
            t_logits = torch.stack(peer_logits).mean(0).detach()
        feats.student[LOGITS], feats.teacher[LOGITS] = logits, t_logits
        loss, parts = _call_loss(self.loss_fn, logits, t_logits, yb, feats)
        if self.peers:
            loss = loss + _mutual_loss(peer_logits, logits, yb)
        return loss, loss * weight, logits


def _device_of(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def fit(model: nn.Module, data: Dataset, cfg: FitConfig, loss_fn: LossFn,
        teacher: nn.Module | None = None, on_epoch: Callable[[dict], None] | None = None, *,
        peers: list[nn.Module] | None = None, cache: TeacherCache | bool | None = None,
        checkpoint=None) -> FitResult:
    """Train ``model`` with ``loss_fn(student_logits, teacher_logits, labels[, feats])``; keep the best state.

    ``loss_fn`` is a losses.Objective (or any callable of the three tensors). Its learned adapters
    are trained with the model. ``peers`` are trained alongside (online mutual learning): the
    model's "teacher logits" are then the peers' mean output. ``cache``: a TeacherCache to reuse,
    True/None to build one when the pipeline is deterministic (``cfg.flip`` off), False for none.
    ``checkpoint``: a checkpoint.PhaseCheckpoint; its state is restored (a finished phase is not
    trained again), saved after every epoch, and saved mid-epoch on SIGINT/SIGTERM, which then
    raise checkpoint.Interrupted. Under torchrun the steps run in DistributedDataParallel (see
    edgekd.distributed).
    """
    from contextlib import nullcontext

    from tqdm import tqdm

    from . import distributed as dd, quant
    from .checkpoint import Interrupted, StopSignals
    from .features import FeatureHooks

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    x, y = as_tensors(data.train)
    steps = math.ceil(len(x) / cfg.batch_size)
    peers = list(peers or [])
    model.to(device)
    for p in peers:
        p.to(device)
    if teacher is not None:
        teacher.eval().to(device)
    _setup_objective(loss_fn, model, teacher, x)
    s_layers, t_layers = getattr(loss_fn, "student_layers", ()), getattr(loss_fn, "teacher_layers", ())
    if cache is None or cache is True:
        cache = teacher_cache(teacher, x, cfg.flip, t_layers, cfg.log)
    extra = list(getattr(loss_fn, "parameters", lambda: [])())
    for prm in extra:
        prm.data = prm.data.to(device)
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:  # before the optimizer: Brevitas replaces its scale Parameters on load
        _restore_modules(saved, model, peers, extra)
    opt, sched = _optimizer(model, peers, extra, cfg, steps)
    best, best_state, history, first_epoch, first_step, order, sums, elapsed = -1.0, None, [], 1, 0, None, [0, 0, 0.0], 0.0
    if saved is not None:
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"]["torch"])
        gen.set_state(saved["rng"]["gen"])
        best, best_state, history, elapsed = saved["best"], saved["best_state"], saved["history"], saved["elapsed"]
        if saved["done"]:
            model.load_state_dict(best_state)
            return FitResult(best, max(history, key=lambda r: r["val_accuracy"])["epoch"], history, elapsed)
        first_epoch, first_step, order, sums = saved["epoch"], saved["step"], saved["order"], saved["sums"]
        if cfg.log:
            cfg.log(f"{cfg.desc}: resuming at epoch {first_epoch}, step {first_step}/{steps}")

    def state(epoch: int, step: int, done: bool = False) -> dict:
        return {"done": done, "epoch": epoch, "step": step, "order": order if step else None, "sums": list(sums),
                "model": model.state_dict(), "quantizers": quant.runtime_state(model),
                "peers": [p.state_dict() for p in peers],
                "extra": [prm.detach().cpu() for prm in extra], "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": {"torch": torch.get_rng_state(), "gen": gen.get_state()},
                "best": best, "best_state": best_state, "history": history,
                "elapsed": elapsed + time.perf_counter() - start}

    step_module, train_module = _step_modules(model, peers, loss_fn, extra, device)
    step_module.s_hooks = FeatureHooks(model, s_layers, "student")
    t_hooks = FeatureHooks(teacher if not cache else None, t_layers, "teacher")
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp and device.type == "cuda" else nullcontext()
    signals = StopSignals(active=checkpoint is not None)  # without a checkpoint, Ctrl-C stops at once
    start = time.perf_counter()
    try:
        with signals:
            for epoch in range(first_epoch, cfg.epochs + 1):
                model.train()
                for p in peers:
                    p.train()
                if order is None:
                    order = torch.randperm(len(x), generator=gen)
                bar = tqdm(total=steps, initial=first_step, desc=f"{cfg.desc} {epoch}/{cfg.epochs}",
                           disable=not cfg.progress or not sys.stderr.isatty() or not dd.is_main(),
                           leave=False, dynamic_ncols=True)
                for step in range(first_step, steps):
                    batch = order[step * cfg.batch_size: (step + 1) * cfg.batch_size]
                    xb = _augment(x[batch], gen) if cfg.flip else x[batch]  # global batch: same draws on every rank
                    local = dd.shard(torch.arange(len(batch)))
                    idx, xb, yb = batch[local], xb[local].to(device), y[batch[local]].to(device)
                    share = len(idx) * dd.world() / len(batch)  # DDP averages: weight by this rank's share
                    t_logits, t_feats = _teacher_outputs(cache, teacher, t_hooks, idx, xb, amp)
                    with amp:
                        loss, weighted, logits = train_module(xb, yb, t_logits, t_feats, share)
                    _check_loss(loss, signals, f"epoch {epoch}, step {step + 1}/{steps} of '{cfg.desc}'",
                                checkpoint, epoch)
                    opt.zero_grad(set_to_none=True)
                    weighted.backward()
                    opt.step()
                    sched.step()
                    sums[0] += len(yb)
                    sums[1] += int((logits.argmax(1) == yb).sum())
                    sums[2] += float(loss.detach()) * len(yb)
                    bar.set_postfix(loss=f"{sums[2] / sums[0]:.4f}", acc=f"{sums[1] / sums[0]:.3f}")
                    bar.update()
                    if signals.received:
                        bar.close()
                        checkpoint.save(state(epoch, step + 1))
                        raise Interrupted(f"interrupted by {signals.received} at epoch {epoch}, step {step + 1}/{steps} "
                                          f"of '{cfg.desc}'; training state saved in {checkpoint.path.parent}",
                                          "run the same command with --resume to continue")
                bar.close()
                seen, correct, loss_sum = dd.all_sum(*sums)
                dd.broadcast_buffers(model)
                for p in peers:
                    dd.broadcast_buffers(p)
                val = accuracy(model, data.val, sharded=True)
                row = {"epoch": epoch, "loss": loss_sum / seen, "train_accuracy": correct / seen, "val_accuracy": val,
                       "lr": sched.get_last_lr()[0], "seconds": elapsed + time.perf_counter() - start}
                history.append(row)
                if val > best:
                    best, best_state = val, copy.deepcopy(model.state_dict())
                    row["best"] = True
                order, first_step, sums = None, 0, [0, 0, 0.0]
                if checkpoint is not None:
                    checkpoint.save(state(epoch + 1, 0, done=epoch == cfg.epochs))
                if on_epoch:
                    on_epoch(row)
    finally:
        step_module.s_hooks.remove()
        t_hooks.remove()
    model.load_state_dict(best_state)
    best_epoch = max(history, key=lambda r: r["val_accuracy"])["epoch"]
    return FitResult(best, best_epoch, history, elapsed + time.perf_counter() - start)


def _optimizer(model, peers, extra, cfg: FitConfig, steps: int):
    """AdamW (weight decay on weights only) with a one-cycle schedule over the whole phase."""
    groups = _param_groups(model, cfg.weight_decay) + [g for p in peers for g in _param_groups(p, cfg.weight_decay)]
    groups += [{"params": extra, "weight_decay": 0.0}] if extra else []
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps, pct_start=0.15)


def _step_modules(model, peers, loss_fn, extra, device: torch.device):
    """The step module, and what the loop calls: the same module, or it wrapped in DDP under torchrun."""
    from . import distributed as dd

    step_module = _Step(model, peers, loss_fn, extra)
    if dd.world() == 1:
        return step_module, step_module
    from torch.nn.parallel import DistributedDataParallel as DDP

    if device.type == "cuda":
        step_module = nn.SyncBatchNorm.convert_sync_batchnorm(step_module)
    # Brevitas adds 0 * scale while it collects statistics, so every parameter gets a gradient.
    return step_module, DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None)


def _teacher_outputs(cache, teacher, t_hooks, idx: torch.Tensor, xb: torch.Tensor, amp):
    """The teacher's logits and features for a batch: from the cache, or by running it."""
    if cache:
        t_logits, t_feats = cache.get(idx)
        return t_logits.to(xb.device), {k: v.to(xb.device) for k, v in t_feats.items()}
    if teacher is None:
        return None, {}
    with torch.no_grad(), amp:
        t_logits = teacher(xb).float()
    return t_logits, t_hooks.take()


def _check_loss(loss: torch.Tensor, signals, where: str, checkpoint, epoch: int) -> None:
    """Stop on a NaN/inf loss. Under torchrun every rank learns whether any rank saw one, or a
    signal, so that all stop at the same step (a rank that stopped alone would hang the others)."""
    from . import distributed as dd
    from .errors import EdgekdError

    bad = not torch.isfinite(loss)
    if dd.world() > 1:
        bad, stop = dd.any_flag(bad, bool(signals.received))
        if stop and not signals.received:
            signals.received = "a signal on another rank"
    if bad:
        kept = (f"; the last good checkpoint (end of epoch {epoch - 1}) is kept in {checkpoint.path.parent}"
                if checkpoint is not None and epoch > 1 else "")
        raise EdgekdError(f"the loss became {loss.item()} at {where}{kept}", "lower --lr (e.g. half of it) and run again")


def _restore_modules(saved: dict, model, peers, extra) -> None:
    from . import quant

    model.load_state_dict(saved["model"])
    quant.restore_runtime_state(model, saved["quantizers"])
    for p, sd in zip(peers, saved["peers"]):
        p.load_state_dict(sd)
    with torch.no_grad():
        for prm, value in zip(extra, saved["extra"]):
            prm.copy_(value)


def set_threads() -> None:
    """Use every core for intra-op parallelism (torch defaults to physical cores); under torchrun
    the node's cores are shared among its processes."""
    from . import distributed as dd

    torch.set_num_threads(dd.local_threads())


def logits_agree(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and max absolute difference between two logit arrays."""
    return float((a.argmax(1) == b.argmax(1)).mean()), float(np.abs(a - b).max())
