"""Safe checkpoints: tensors and JSON-like metadata that load with ``torch.load(weights_only=True)``
or safetensors, never unpickled."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..core.errors import CheckpointError, IncompatibleError, MissingFileError
from .specs import build_model


def save_checkpoint(path: Path, state_dict: dict, meta: dict) -> None:
    """Save tensors and JSON-like metadata in a file that loads with weights_only=True."""
    from ..core.fsutil import atomic_path

    payload = {"format": "edgekd-checkpoint-1", "meta": meta,
               "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint without executing code: edgekd/.pt via weights_only, or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}", "check the path, or train one with 'edgekd train'")
    if path.suffix == ".safetensors":
        return {"format": "safetensors", "meta": {}, "state_dict": _load_safetensors(path)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "WeightsUnpickler error" not in str(e):
            raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch file or corrupt") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"a pickled object ({found.group(1)})" if found else "pickle opcodes that are not plain tensors"
        raise CheckpointError(f"refusing to load {path}: the safe loader found {what} (a pickle payload, "
                              "or a corrupt file)",
                              "re-save it as a state_dict or .safetensors") from None
    except Exception as e:  # truncated or not a torch file
        detail = " ".join(str(e).split()).split(". ")[0][:160]  # torch's first sentence, not its advice
        raise CheckpointError(f"cannot read checkpoint {path}: truncated, corrupt or not a PyTorch file "
                              f"({type(e).__name__}: {detail})", "pass a complete .pt or .safetensors file") from None
    if isinstance(obj, dict) and obj.get("format") == "edgekd-checkpoint-1":
        return obj
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"format": "state_dict", "meta": {}, "state_dict": obj}
    raise CheckpointError(f"{path} is not a state_dict or an edgekd checkpoint")


def _load_safetensors(path: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        from ..core.errors import MissingExtraError

        raise MissingExtraError("safetensors", "safetensors", "loading .safetensors checkpoints") from None
    return load_file(str(path))


def load_weights(model: nn.Module, state_dict: dict, source: str) -> None:
    """Load weights strictly; a mismatch names the first offending key and both shapes."""
    own = model.state_dict()
    wrong = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in own.items()
             if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if wrong:
        k, got, want = wrong[0]
        raise CheckpointError(f"checkpoint {source} does not fit the architecture: {k} has shape {got}, "
                              f"the model expects {want} ({len(wrong)} mismatched tensors)",
                              "build the same architecture, dataset classes and input channels it was trained with")
    try:  # strict: Brevitas's own loaders accept the scale parameters it creates lazily
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:240]
        raise CheckpointError(f"checkpoint {source} does not fit the architecture: {detail}",
                              "check the model spec matches the checkpoint") from None


def load_model(path: str | Path, expect_classes: int | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a float model saved by edgekd (architecture and shapes are in its metadata)."""
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    if "arch" not in meta:
        raise CheckpointError(f"{path} has weights but no architecture",
                              "use a checkpoint written by 'edgekd train' (it records the architecture), "
                              "or pass an architecture name as --teacher to train one")
    if expect_classes is not None and meta["num_classes"] != expect_classes:
        raise IncompatibleError(f"teacher {path} predicts {meta['num_classes']} classes but the dataset has "
                                f"{expect_classes}", "use a teacher trained on the same dataset")
    model = build_model(meta["arch"], meta["num_classes"], tuple(meta["input_shape"]))
    load_weights(model, ckpt["state_dict"], str(path))
    return model, meta
