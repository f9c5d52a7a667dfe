"""Safe checkpoints: tensors and JSON-like metadata that load with ``torch.load(weights_only=True)``
or safetensors, never unpickled."""

from __future__ import annotations

import math
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..core.errors import CheckpointError, IncompatibleError, MissingFileError
from ..config.options import MAX_SEED, shown
from .safefile import check_safetensors, check_state, check_values
from .specs import build_model, check_trusted

MAX_CLASSES = 2**20  # a head larger than this is a damaged file, not a model
MAX_INPUT = 2**26  # C * H * W of one input (a 3 x 4096 x 4096 image is 2^25.6)


def save_checkpoint(path: Path, state_dict: dict, meta: dict) -> None:
    """Save tensors and JSON-like metadata in a file that loads with weights_only=True."""
    from ..core.fsutil import atomic_path

    payload = {"format": "edgekd-checkpoint-1", "meta": meta,
               "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, what: str = "checkpoint",
                    missing_fix: str = "check the path, or train one with 'edgekd train'") -> dict:
    """Load a checkpoint without executing code: edgekd/.pt via weights_only, or .safetensors.
    ``what`` and ``missing_fix`` word the error for a path that is a folder or is missing."""
    path = Path(path)
    check_input(path, what, missing_fix)
    if path.suffix == ".safetensors":
        return {"format": "safetensors", "meta": {}, "state_dict": check_state(_load_safetensors(path), path)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused(path, str(e)) from None
    except Exception as e:  # truncated or not a torch file
        detail = " ".join(str(e).split()).split(". ")[0][:160]  # torch's first sentence, not its advice
        raise CheckpointError(f"cannot read checkpoint {path}: truncated, corrupt or not a PyTorch file "
                              f"({type(e).__name__}: {detail})", "pass a complete .pt or .safetensors file") from None
    if isinstance(obj, dict) and obj.get("format") == "edgekd-checkpoint-1":
        if not isinstance(obj.get("meta"), dict):
            raise CheckpointError(f"{path} is damaged: its metadata is not a table", "use the file edgekd wrote")
        check_state(obj.get("state_dict"), path)
        return obj
    from .weights import WRAPPERS, unwrap

    state = unwrap(obj)
    if state is not None:
        return {"format": "state_dict", "meta": {}, "state_dict": check_state(state, path)}
    raise CheckpointError(f"{path} is not a state_dict or an edgekd checkpoint",
                          f"save model.state_dict() (or a dict holding it under one of {', '.join(WRAPPERS)}), "
                          "or .safetensors")


def check_input(path: Path, what: str = "checkpoint",
                missing_fix: str = "check the path, or train one with 'edgekd train'") -> None:
    """One MissingFileError unless ``path`` is a regular file: a folder, nothing, or what else it is
    (a FIFO, a device, a link that loops: never opened)."""
    from ..core import inputfile

    found = inputfile.kind(path)
    if found == inputfile.DIRECTORY:
        raise MissingFileError(f"{what} {path} is a directory, not a file",
                               "pass the file inside it (edgekd writes model.pt or student.pt)")
    if found == inputfile.MISSING:
        raise MissingFileError(f"{what} not found: {path}", missing_fix)
    if found != inputfile.FILE:
        raise MissingFileError(f"{what} {path} is {found}, not a regular file", "pass a .pt or .safetensors file")


def _refused(path: Path, error: str) -> CheckpointError:
    """The error for a file the safe (weights-only) unpickler refused: a pickle payload names the
    object it would have built (torch words this "Weights only load failed ... GLOBAL posix.system"
    or "WeightsUnpickler error"); anything else the unpickler cannot read is a corrupt file."""
    if "WeightsUnpickler error" not in error and "Weights only load failed" not in error:
        return CheckpointError(f"cannot read checkpoint {path}: not a PyTorch file or corrupt")
    found = re.search(r"GLOBAL ([\w.]+)", error)
    what = f"a pickled object ({found.group(1)})" if found else "pickle opcodes that are not plain tensors"
    return CheckpointError(f"refusing to load {path}: the safe loader found {what} (a pickle payload, "
                           "or a corrupt file)", "re-save it as a state_dict or .safetensors")


def _load_safetensors(path: Path) -> dict:
    """The tensors of a .safetensors file whose header was checked first (models.safefile)."""
    check_safetensors(path)
    try:
        from safetensors.torch import load_file
    except ImportError:
        from ..core.errors import MissingExtraError

        raise MissingExtraError("safetensors", "safetensors", "loading .safetensors checkpoints") from None
    try:
        return load_file(str(path))
    except Exception as e:  # what the header check does not foresee (e.g. a dtype this torch lacks)
        detail = " ".join(str(e).split())[:160]
        raise CheckpointError(f"cannot read weights file {path} ({type(e).__name__}: {detail})",
                              "pass a complete .safetensors file") from None


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
    check_values(own, state_dict, f"checkpoint {source}")
    try:  # strict: Brevitas's own loaders accept the scale parameters it creates lazily
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:240]
        raise CheckpointError(f"checkpoint {source} does not fit the architecture: {detail}",
                              "check the model spec matches the checkpoint") from None


def check_meta(meta: dict, path, keys=("arch", "num_classes", "input_shape")) -> dict:
    """``meta`` if each of ``keys`` it must hold is there with the right type, else one
    CheckpointError naming the file and the key (a damaged or hand-edited checkpoint)."""
    def positive_ints(v, n=None):
        return isinstance(v, list) and (n is None or len(v) == n) and all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v) and math.prod(v) <= MAX_INPUT

    def numbers(v):
        return isinstance(v, list) and v and all(isinstance(d, (int, float)) and not isinstance(d, bool)
                                                 and math.isfinite(d) for d in v)

    checks = {"arch": (lambda v: isinstance(v, str) and v != "", "a model spec (a string)"),
              "num_classes": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= MAX_CLASSES,
                              f"an integer between 2 and {MAX_CLASSES}"),
              "input_shape": (lambda v: positive_ints(v, 3),
                              f"three positive integers [C, H, W] with C*H*W at most {MAX_INPUT}"),
              "dataset": (lambda v: isinstance(v, str) and v != "", "a dataset spec (a string)"),
              "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEED,
                       f"an integer between 0 and {MAX_SEED}"),
              "classes": (lambda v: isinstance(v, list) and len(v) == meta.get("num_classes"),
                          "a list of num_classes names"),
              "normalization": (lambda v: isinstance(v, dict) and numbers(v.get("mean")) and numbers(v.get("std")),
                                "a table with lists of numbers 'mean' and 'std'"),
              "quant": (lambda v: isinstance(v, dict), "a table")}
    for key in keys:
        if key not in meta:
            raise CheckpointError(f"{path} is damaged: its metadata has no {key!r}", "use the file edgekd wrote")
        ok, expected = checks[key]
        if not ok(meta[key]):
            raise CheckpointError(f"{path} is damaged: metadata {key!r} must be {expected}, got {shown(meta[key])}",
                                  "use the file edgekd wrote")
    return meta


def load_model(path: str | Path, expect_classes: int | None = None, arch: str | None = None,
               trust_code: bool = False, how: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a float model saved by edgekd (architecture and shapes are in its metadata).

    ``arch``: build this spec instead of the one the file names (given on the command line, so
    trusted). Otherwise the file's spec may name code only with ``trust_code``; ``how`` is the
    command-line spelling the refusal suggests (default ``--teacher ARCH=FILE``)."""
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    if "arch" not in meta and arch is None:
        raise CheckpointError(f"{path} has weights but no architecture",
                              f"name the architecture they belong to: --teacher ARCH={path} (e.g. "
                              f"torchvision:resnet18={path}), or use a checkpoint written by 'edgekd train'")
    check_meta(meta, path, ("num_classes", "input_shape") + (("arch",) if arch is None else ()))
    if expect_classes is not None and meta["num_classes"] != expect_classes:
        raise IncompatibleError(f"teacher {path} predicts {meta['num_classes']} classes but the dataset has "
                                f"{expect_classes}", "use a teacher trained on the same dataset")
    if arch is None:
        check_trusted(meta["arch"], str(path), how or f"--teacher {meta['arch']}={path}", trust_code)
    model = build_model(arch or meta["arch"], meta["num_classes"], tuple(meta["input_shape"]))
    load_weights(model, ckpt["state_dict"], str(path))
    return model, meta
