"""The training loop: one phase (float teacher, float KD, or QAT with KD) of a model on a dataset.

``fit`` reads in one screen: prepare the phase (seed, device, the objective's layers, the teacher
cache, the optimizer, the state of an interrupted run), then run its epochs, each a loop of
training steps followed by validation, and return the best state. The parts are the methods of
``Phase``; multi-process training (edgekd.training.distributed), mixed precision, the NaN stop,
SIGINT/SIGTERM and checkpoints (edgekd.training.checkpoint) each live in one of them.

Batches follow a seeded permutation (the same order on every machine for a seed); each epoch ends
with validation, and the state with the best validation accuracy is kept.
"""

from __future__ import annotations

import copy
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import EdgekdError
from ..data import Dataset
from ..kd.features import LOGITS, Feats, FeatureHooks, Probe
from ..kd.teachers import Teachers
from . import distributed as dd
from .cache import TeacherCache, teacher_cache
from .checkpoint import Interrupted, StopSignals, restore_rng, rng_state
from .batches import LoaderBatches, batches_for
from .evaluate import accuracy
from .optim import optimizer, param_groups

Log = Callable[[str], None]


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
    log: Log | None = None  # info lines (e.g. why the teacher cache is off)
    device: str = "cpu"  # "cuda" / "cuda:N": model, batches and the teacher on the GPU
    amp: bool = False  # bfloat16 autocast on CUDA (float phases only: QAT stays in float32)
    optimizer: str = "adamw"  # adamw | sgd (Nesterov momentum 0.9): the teacher's recipe


@dataclass
class FitResult:
    best_val_accuracy: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class State:
    """Where a phase stands: what a checkpoint keeps besides the modules and the optimizer."""

    epoch: int = 1
    step: int = 0  # steps done in ``epoch``
    order: torch.Tensor | None = None  # the epoch's sample order (None: draw it)
    sums: list = field(default_factory=lambda: [0, 0, 0.0])  # samples, correct, loss * samples
    best: float = -1.0
    best_state: dict | None = None
    history: list = field(default_factory=list)
    elapsed: float = 0.0
    done: bool = False


def fit(model: nn.Module, data: Dataset, cfg: FitConfig, loss_fn, teacher: nn.Module | None = None,
        on_epoch: Callable[[dict], None] | None = None, *, peers: list[nn.Module] | None = None,
        cache: TeacherCache | bool | None = None, checkpoint=None) -> FitResult:
    """Train ``model`` with ``loss_fn(student_logits, teacher_logits, labels, feats)``; keep the best state.

    ``loss_fn`` is a kd.Objective (an nn.Module: its adapters train and move with the model) or
    any callable of the three tensors. ``peers`` are trained alongside (online mutual learning):
    the model's "teacher logits" are then the peers' (a kd.Teachers "each" group for several: one term
    per peer, summed). ``cache``: a TeacherCache to reuse, True/None to build one when the pipeline is
    deterministic (``cfg.flip`` off), False for none. ``checkpoint``: a checkpoint.PhaseCheckpoint; its
    state is restored (a finished phase is not trained again), saved after every epoch, and saved
    mid-epoch on SIGINT/SIGTERM, which then raise checkpoint.Interrupted. Under torchrun the steps run
    in DistributedDataParallel.
    """
    phase = Phase(model, data, cfg, loss_fn, teacher, list(peers or []), checkpoint)
    phase.prepare(cache)
    for row in phase.state.history if on_epoch else ():  # epochs restored by --resume stay in the run's history
        on_epoch(row)
    if not phase.state.done:
        with phase.running():
            for epoch in range(phase.state.epoch, cfg.epochs + 1):
                phase.train_epoch(epoch)
                phase.end_epoch(epoch, on_epoch)
    return phase.result()


class Phase:
    """One ``fit``: the modules, the optimizer and the State, with one method per part of the loop."""

    def __init__(self, model, data, cfg: FitConfig, loss_fn, teacher, peers, checkpoint):
        self.model, self.data, self.cfg, self.loss_fn = model, data, cfg, loss_fn
        self.teacher, self.peers, self.checkpoint = teacher, peers, checkpoint
        self.state, self.start = State(), time.perf_counter()

    # --- before the first step ------------------------------------------------------------------

    def prepare(self, cache) -> None:
        """Seed, device, the objective's layers and the teacher cache, the optimizer, then the state
        of an interrupted run (modules before the optimizer: Brevitas replaces scale Parameters)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.device = dd.resolve_device(cfg.device)
        train = self.data.train
        self.batches = batches_for(train, cfg.batch_size, cfg.flip, cfg.seed, getattr(train, "workers", 0))
        self.steps = self.batches.steps
        if cfg.log and getattr(train, "cache_line", None):  # an image folder: where its training images come from
            cfg.log(train.cache_line(crops=isinstance(self.batches, LoaderBatches)))
        for module in (self.model, *self.peers):
            module.to(self.device)
        if self.teacher is not None:
            self.teacher.eval().to(self.device)
        if getattr(self.loss_fn, "needs_setup", False):
            self.loss_fn.setup(Probe(self.model, self.teacher, self.batches.head(8)))
        layers = getattr(self.loss_fn, "teacher_layers", ())
        crop = getattr(train, "crops", False)  # random crops: the teacher's inputs are not known in advance
        self.cache = teacher_cache(self.teacher, self.batches.source, cfg.flip, layers, cfg.log, crop) \
            if cache in (None, True) else cache
        if isinstance(self.loss_fn, nn.Module):
            self.loss_fn.to(self.device)
        saved = self.checkpoint.load() if self.checkpoint is not None else None
        if saved is not None:
            with self.checkpoint.restoring():  # a damaged state: one line naming the file
                self._restore_modules(saved)
        self.opt, self.sched = self._optimizer()
        if saved is not None:
            with self.checkpoint.restoring():
                self._restore_state(saved)

    def _optimizer(self):
        """AdamW (or SGD with Nesterov momentum; weight decay on weights only) with a one-cycle schedule
        over the whole phase (warm-up 15% of the steps with AdamW, 25% with SGD, as measured)."""
        cfg = self.cfg
        groups = [g for m in (self.model, *self.peers) for g in param_groups(m, cfg.weight_decay)]
        adapters = list(self.loss_fn.parameters()) if isinstance(self.loss_fn, nn.Module) else []
        groups += [{"params": adapters, "weight_decay": 0.0}] if adapters else []
        return optimizer(groups, cfg.optimizer, cfg.lr, cfg.epochs * self.steps)

    def _restore_modules(self, saved: dict) -> None:
        from ..quant import restore_runtime_state

        self.model.load_state_dict(saved["model"])
        restore_runtime_state(self.model, saved["quantizers"])
        for p, sd in zip(self.peers, saved["peers"]):
            p.load_state_dict(sd)
        if isinstance(self.loss_fn, nn.Module):
            self.loss_fn.load_state_dict(saved["objective"])

    def _restore_state(self, saved: dict) -> None:
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        restore_rng(saved["rng"], self.gen)
        self.state = State(**{k: saved[k] for k in ("epoch", "step", "order", "sums", "best", "best_state", "history",
                                                      "elapsed", "done")})
        if self.state.done:
            self.model.load_state_dict(self.state.best_state)
        elif self.cfg.log:
            self.cfg.log(f"{self.cfg.desc}: resuming at epoch {self.state.epoch}, step {self.state.step}/{self.steps}")

    def running(self) -> ExitStack:
        """What is active while steps run: feature hooks, SIGINT/SIGTERM handling (with a
        checkpoint; without one Ctrl-C stops at once), the DDP wrapper and autocast."""
        stack = ExitStack()
        self.step_module, self.train_module = _step_modules(self.model, self.peers, self.loss_fn, self.device, stack)
        self.step_module.s_hooks = stack.enter_context(
            FeatureHooks(self.model, getattr(self.loss_fn, "student_layers", ()), "student"))
        self.t_hooks = stack.enter_context(FeatureHooks(self.teacher if not self.cache else None,
                                                        getattr(self.loss_fn, "teacher_layers", ()), "teacher"))
        self.signals = stack.enter_context(StopSignals(active=self.checkpoint is not None))
        amp = self.cfg.amp and self.device.type == "cuda"
        self.amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if amp else nullcontext()
        self.start = time.perf_counter()
        return stack

    # --- an epoch ---------------------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> None:
        from tqdm import tqdm

        st, cfg = self.state, self.cfg
        for module in (self.model, *self.peers):
            module.train()
        if st.order is None:
            st.order = torch.randperm(len(self.batches), generator=self.gen)
        bar = tqdm(total=self.steps, initial=st.step, desc=f"{cfg.desc} {epoch}/{cfg.epochs}", leave=False,
                   disable=not cfg.progress or not sys.stderr.isatty() or not dd.is_main(), dynamic_ncols=True)
        schedule = getattr(self.loss_fn, "set_epoch", None)  # the objective's schedules (DKD's warm-up)
        for batch in self.batches.epoch(st.order, st.step, epoch, self.gen, self.device):
            if schedule is not None:
                schedule(epoch - 1 + (st.step + 1) / self.steps, cfg.epochs)
            self.train_step(epoch, *batch)
            bar.set_postfix(loss=f"{st.sums[2] / st.sums[0]:.4f}", acc=f"{st.sums[1] / st.sums[0]:.3f}")
            bar.update()
            if self.signals.received:
                bar.close()
                self.save(epoch, st.step)
                raise Interrupted(f"interrupted by {self.signals.received} at epoch {epoch}, step {st.step}/{self.steps} "
                                  f"of '{cfg.desc}'; training state saved in {self.checkpoint.path.parent}",
                                  "run the same command with --resume to continue")
        bar.close()

    def train_step(self, epoch: int, idx, xb, yb, flipped, share: float) -> None:
        """One optimizer step on this process's share of a global batch (training.batches): sample
        indices, images and labels on the device, which images were flipped, the share of the batch."""
        st, cfg = self.state, self.cfg
        t_logits, t_feats = self._teacher_outputs(idx, xb, flipped)
        with self.amp:
            loss, weighted, logits, parts = self.train_module(xb, yb, t_logits, t_feats, share)
        self._check_loss(loss, f"epoch {epoch}, step {st.step + 1}/{self.steps} of '{cfg.desc}'", epoch)
        self.opt.zero_grad(set_to_none=True)
        weighted.backward()
        self.opt.step()
        self.sched.step()
        st.sums[0] += len(yb)
        st.sums[1] += int((logits.argmax(1) == yb).sum())
        st.sums[2] += float(loss.detach()) * len(yb)
        add_parts(st.sums, parts, len(yb))
        st.step += 1

    def _teacher_outputs(self, idx: torch.Tensor, xb: torch.Tensor, flipped):
        """The teacher's logits and features for a batch: from the cache (the mirrored entry for a
        flipped image), or by running it."""
        if self.cache:
            t_logits, t_feats = self.cache.get(idx, flipped)
            return t_logits.to(xb.device), {k: v.to(xb.device) for k, v in t_feats.items()}
        if self.teacher is None:
            return None, {}
        with torch.no_grad(), self.amp:
            t_logits = self.teacher(xb).float()
        return t_logits, self.t_hooks.take()

    def _check_loss(self, loss: torch.Tensor, where: str, epoch: int) -> None:
        """Stop on a NaN/inf loss. Under torchrun every rank learns whether any rank saw one, or a
        signal, so that all stop at the same step (a rank that stopped alone would hang the others)."""
        bad = not torch.isfinite(loss)
        if dd.world() > 1:
            bad, stop = dd.any_flag(bad, bool(self.signals.received))
            if stop and not self.signals.received:
                self.signals.received = "a signal on another rank"
        if bad:
            kept = (f"; the last good checkpoint (end of epoch {epoch - 1}) is kept in {self.checkpoint.path.parent}"
                    if self.checkpoint is not None and epoch > 1 else "")
            raise EdgekdError(f"the loss became {loss.item()} at {where}{kept}",
                              "lower --lr (e.g. half of it) and run again")

    def end_epoch(self, epoch: int, on_epoch) -> None:
        """Validation (batch norms and counts agreed across ranks), the best state, the checkpoint."""
        st = self.state
        seen, correct, loss_sum = dd.all_sum(*st.sums[:3])
        for module in (self.model, *self.peers):
            dd.broadcast_buffers(module)
        val = accuracy(self.model, self.data.val, sharded=True)
        row = {"epoch": epoch, "loss": loss_sum / seen, "train_accuracy": correct / seen, "val_accuracy": val,
               "lr": self.sched.get_last_lr()[0], "seconds": st.elapsed + time.perf_counter() - self.start,
               "losses": {k: v / st.sums[0] for k, v in (st.sums[3] if len(st.sums) > 3 else {}).items()}}
        st.history.append(row)
        if val > st.best:
            st.best, st.best_state = val, copy.deepcopy(self.model.state_dict())
            row["best"] = True
        st.order, st.step, st.sums = None, 0, [0, 0, 0.0]
        if self.checkpoint is not None:
            self.save(epoch + 1, 0, done=epoch == self.cfg.epochs)
        if on_epoch:
            on_epoch(row)

    # --- checkpoints and the result -----------------------------------------------------------------

    def save(self, epoch: int, step: int, done: bool = False) -> None:
        from ..quant import runtime_state

        st = self.state
        objective = self.loss_fn.state_dict() if isinstance(self.loss_fn, nn.Module) else {}
        self.checkpoint.save({
            "done": done, "epoch": epoch, "step": step, "order": st.order if step else None, "sums": list(st.sums),
            "model": self.model.state_dict(), "quantizers": runtime_state(self.model),
            "peers": [p.state_dict() for p in self.peers], "objective": objective,
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "rng": rng_state(self.gen),
            "best": st.best, "best_state": st.best_state, "history": st.history,
            "elapsed": st.elapsed + time.perf_counter() - self.start})

    def result(self) -> FitResult:
        st = self.state
        elapsed = st.elapsed if st.done else st.elapsed + time.perf_counter() - self.start
        self.model.load_state_dict(st.best_state)
        best_epoch = max(st.history, key=lambda r: r["val_accuracy"])["epoch"]
        return FitResult(st.best, best_epoch, st.history, elapsed)


# --- the pieces of a step ---------------------------------------------------------------------------

def add_parts(sums: list, parts: dict, n: int) -> None:
    """Add a step's loss terms (the objective's named parts, each a batch mean) to the epoch's
    sums, kept as ``sums[3]`` so that a checkpoint carries them; the epoch row has their means."""
    if len(sums) < 4:
        sums.append({})
    for name, value in (parts or {}).items():
        sums[3][name] = sums[3].get(name, 0.0) + float(value) * n


def compute_loss(loss_fn, logits, t_logits, labels, feats):
    """Objectives take the captured features; plain (s, t, y) callables still work."""
    if isinstance(loss_fn, nn.Module) or getattr(loss_fn, "wants_layers", False):
        return loss_fn(logits, t_logits, labels, feats)
    return loss_fn(logits, t_logits, labels)


def mutual_loss(peer_logits: list[torch.Tensor], logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DML (Zhang et al. 2018) for the peers: CE + one KL(other || peer) at T=1 per other network (the
    student and the other peers), summed as the authors' code does (YingZhangDUT/Deep-Mutual-Learning,
    train_models.py ``_tower_loss``; the paper's Eq. 10 averages over the K-1 others instead)."""
    from ..kd import kd_divergence

    everyone = [logits.detach()] + [p.detach() for p in peer_logits]
    loss = 0.0
    for i, p in enumerate(peer_logits):
        loss = loss + F.cross_entropy(p, labels)
        for other in (e for j, e in enumerate(everyone) if j != i + 1):
            loss = loss + kd_divergence(p, other, 1.0)
    return loss


class _Step(nn.Module):
    """One training step's forward: student, peers and the objective (with its adapters) in one
    module, so that DistributedDataParallel averages the gradients of all of them."""

    def __init__(self, model: nn.Module, peers: list[nn.Module], loss_fn):
        super().__init__()
        self.model, self.peers, self.loss_fn = model, nn.ModuleList(peers), loss_fn
        self.s_hooks = None

    def forward(self, xb, yb, t_logits, t_feats, weight: float):
        feats = Feats()
        feats.teacher = t_feats
        logits = self.model(xb)
        feats.student = self.s_hooks.take()
        peer_logits = [p(xb) for p in self.peers]
        if self.peers:  # one term per peer, summed (DML's reference): a kd.Teachers "each" group
            detached = [p.detach() for p in peer_logits]
            t_logits = detached[0] if len(detached) == 1 else Teachers.each(detached)
        feats.student[LOGITS], feats.teacher[LOGITS] = logits, t_logits
        loss, parts = compute_loss(self.loss_fn, logits, t_logits, yb, feats)
        if self.peers:
            loss = loss + mutual_loss(peer_logits, logits, yb)
        parts = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in (parts or {}).items()}  # DDP: 1 graph
        return loss.detach(), loss * weight, logits.detach(), parts


def _step_modules(model, peers, loss_fn, device: torch.device, stack: ExitStack):
    """The step module, and what the loop calls: the same module, or it wrapped in DDP under torchrun.
    On CUDA the batch norms sync across ranks while ``stack`` is open; it puts the BatchNorms back."""
    step_module = _Step(model, peers, loss_fn)
    if dd.world() == 1:
        return step_module, step_module
    from torch.nn.parallel import DistributedDataParallel as DDP

    if dd.sync_batchnorm(device):
        stack.enter_context(dd.synced_batchnorm(step_module))
    # fsp's first stage leaves the classifier without a gradient: a static graph finds unused parameters once.
    return step_module, DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None,
                            static_graph=True)


def set_threads() -> None:
    """Use every core for intra-op parallelism (torch defaults to physical cores); under torchrun
    the node's cores are shared among its processes."""
    torch.set_num_threads(dd.local_threads())
