"""Weights from a user's file into an architecture built in code (``ARCH=WEIGHTS`` model specs).

The file may be a plain ``state_dict``, a ``{"state_dict": ...}`` / ``{"model": ...}`` /
``{"model_state_dict": ...}`` wrapper, an edgekd checkpoint, or safetensors; ``module.`` prefixes
(DataParallel / DDP) and ``_orig_mod.`` (torch.compile) are stripped. Nothing is unpickled
(``torch.load(weights_only=True)``). A key or shape mismatch is one error naming the first
mismatched keys with both shapes and the likely cause; two mismatches are repaired on purpose and
logged: a head whose class count differs (``new_head``: a student loaded from weights gets a new,
randomly initialised head) and an RGB stem loaded into a one-channel model (weights summed over
the colour channels, as timm's ``adapt_input_conv`` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..core.errors import CheckpointError
from .safefile import check_values

WRAPPERS = ("state_dict", "model", "model_state_dict", "net", "module")
PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` in any of the layouts above, prefixes stripped."""
    return read_weights(path)[0]


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors with prefixes stripped, the file's edgekd metadata or {}) of a weights file."""
    from .checkpoints import load_checkpoint

    # safe: weights_only / safetensors; edgekd checkpoints keep their state_dict
    ckpt = load_checkpoint(path, "weights file", "check the path in ARCH=WEIGHTS")
    return {_strip(k): v for k, v in ckpt["state_dict"].items()}, ckpt["meta"]


@dataclass
class Built:
    """A model built from a spec: the module, the architecture part of the spec (what a run records),
    the weights file it was loaded from, and what was repaired."""

    model: nn.Module
    arch: str
    weights: str | None = None
    new_head: bool = False
    notes: list = field(default_factory=list)


def from_spec(spec: str, num_classes: int, input_shape: tuple[int, int, int], *, student: bool,
              trust_code: bool = False, log: Callable[[str], None] = lambda s: None, role: str | None = None) -> Built:
    """Build ``spec`` for the data's classes and input shape: an architecture (random weights),
    ``ARCH=WEIGHTS`` (the architecture named here, trusted: it comes from the caller), or an edgekd
    checkpoint file alone (its recorded architecture, which may name code only with ``trust_code``).

    ``student``: a head whose class count differs is replaced by a new one (logged); for a
    teacher that is an error naming the class count."""
    from .checkpoints import check_meta
    from .specs import build_model, check_trusted, split_weights

    role = role or ("student" if student else "teacher")
    arch, file = split_weights(spec)
    if file is None:
        return Built(build_model(arch, num_classes, input_shape), arch)
    state, meta = read_weights(file)
    if arch is None:
        if "arch" not in meta:
            raise CheckpointError(f"{file} has weights but no architecture",
                                  f"name the architecture they belong to: --{role} ARCH={file} (e.g. "
                                  f"torchvision:resnet18={file})")
        check_meta(meta, file, ("arch",))
        check_trusted(meta["arch"], file, f"--{role} {meta['arch']}={file}", trust_code)
        arch = split_weights(meta["arch"])[0] or meta["arch"]
    notes: list[str] = []
    model = build_model(arch, num_classes, input_shape)
    apply_weights(model, state, file, new_head=student, log=lambda line: (notes.append(line), log(line)))
    return Built(model, arch, file, any("new head" in n for n in notes), notes)


def unwrap(obj) -> dict | None:
    """The state_dict inside a training script's checkpoint dict, or None if there is none."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in WRAPPERS:
        inner = obj.get(key) if isinstance(obj, dict) else None
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return None


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _first_and_last(model: nn.Module) -> tuple[str | None, str | None]:
    """State-dict names of the first conv's weight (the stem) and the last Linear/Conv's (the head)."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Conv1d))]
    if not layers:
        return None, None
    return f"{layers[0]}.weight", f"{layers[-1]}.weight"


def apply_weights(model: nn.Module, state: dict, source: str, new_head: bool = False,
                  log: Callable[[str], None] = lambda s: None) -> nn.Module:
    """Load ``state`` into ``model`` strictly, repairing only a new head (``new_head``) or an RGB stem
    on one-channel data; any other mismatch raises one CheckpointError with the likely cause."""
    own = model.state_dict()
    stem, head = _first_and_last(model)
    state = dict(state)
    if stem in state and stem in own:
        state[stem] = _adapt_stem(state[stem], own[stem], source, log)
    head_prefix = head.rsplit(".", 1)[0] + "." if head else None
    if new_head and head in state and head in own and state[head].shape != own[head].shape:
        log(f"{source}: the head {head_prefix[:-1]} predicts {state[head].shape[0]} classes, the data has "
            f"{own[head].shape[0]}: it gets a new head, trained from scratch")
        state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
        state.update({k: v for k, v in own.items() if k.startswith(head_prefix)})
    _check_fit(own, state, source, stem, head)
    check_values(own, state, source)
    state.update({k: v for k, v in own.items() if k not in state and k.endswith("num_batches_tracked")})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # names and shapes fit (checked above), yet a tensor does not copy
        detail = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{source} does not load into the architecture: {detail}",
                              "save the weights as float tensors from model.state_dict()") from None
    return model


def _adapt_stem(weight: torch.Tensor, target: torch.Tensor, source: str, log) -> torch.Tensor:
    if weight.ndim == 4 and target.ndim == 4 and weight.shape[1] == 3 and target.shape[1] == 1 \
            and weight.shape[0] == target.shape[0] and weight.shape[2:] == target.shape[2:]:
        log(f"{source}: the stem takes RGB, the data is grayscale: its weights are summed over the colour channels")
        return weight.sum(1, keepdim=True)
    return weight


def _check_fit(own: dict, state: dict, source: str, stem: str | None, head: str | None) -> None:
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if not (wrong or missing or unexpected):
        return
    parts = [", ".join(f"{k} is {got} in the file, {want} in the model" for k, got, want in wrong[:3])] if wrong else []
    if missing:
        parts.append(f"{len(missing)} keys missing from the file (first: {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys in the file (first: {', '.join(unexpected[:3])})")
    raise CheckpointError(f"{source} does not fit the architecture: {'; '.join(parts)}",
                          _likely_cause(wrong, missing, unexpected, stem, head))


def _likely_cause(wrong, missing, unexpected, stem, head) -> str:
    names = {k for k, _, _ in wrong}
    if head in names:
        got = next(g for k, g, _ in wrong if k == head)
        return (f"likely cause: the class count (the file's head predicts {got[0]} classes): use a dataset with "
                "those classes, or load it as a student (a new head is made for students)")
    if stem in names:
        got, want = next((g, w) for k, g, w in wrong if k == stem)
        if len(got) == 4 and got[1] != want[1]:
            return (f"likely cause: the input channels ({got[1]} in the file, {want[1]} in the data): "
                    f"pass --channels {got[1]}")
        return "likely cause: the stem (its kernel or width differs): check the architecture name"
    if missing and unexpected and len(missing) == len(unexpected):
        return "likely cause: the layer names differ: check the architecture (and prefixes such as 'backbone.')"
    return "check that ARCH is the architecture the weights were saved from"
