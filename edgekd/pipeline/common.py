"""What every stage of the pipeline shares: log callbacks, names of runs, a model's metadata."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from .. import __version__
from ..core.errors import EdgekdError

Log = Callable[[str], None]


def quiet(_: str) -> None:
    pass


def slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(str(p) for p in parts)).strip("-").lower()


def dataset_name(spec: str) -> str:
    """A short name for run folders: the spec's kind, an npz file's stem, an image folder's name."""
    kind, _, arg = spec.partition(":")
    if kind == "npz":
        return Path(arg).stem
    if kind == "imagefolder" and arg:
        return f"{Path(arg).resolve().name or 'root'}"
    return kind


def data_inputs(spec: str) -> list[Path]:
    """The files or folders a dataset spec reads (an output must not replace them)."""
    kind, _, arg = spec.partition(":")
    return [Path(arg)] if kind in ("npz", "fashion-mnist", "imagefolder") and arg else []


# options that change how a run is done, not what it produces: a resumed run may change them
NOT_DEFINING = ("progress", "workers", "image_cache", "force")


def options_dict(opts) -> dict:
    """The options that define a run's result (a resumed run must have the same)."""
    return {k: v for k, v in asdict(opts).items() if k not in NOT_DEFINING}


def data_options(opts):
    """The data.DataOptions of a TrainOptions / DistillOptions."""
    from ..data.options import data_options as of

    return of(opts)


def load_data(spec: str, seed: int, options, torch_data=None):
    """The dataset of a run: ``torch_data`` (the Python API's api.TorchData) or the spec read with
    ``options`` (data.DataOptions)."""
    if torch_data is not None:
        return torch_data.dataset(seed)
    from ..data import load_dataset

    _check_cache_dir(spec, options)
    return load_dataset(spec, seed=seed, options=options)


def _check_cache_dir(spec: str, options) -> None:
    """An image folder read through the decoded-image cache: a cache folder that cannot be made
    (``$EDGEKD_CACHE_DIR`` a file, /dev/null) is one line before anything is written."""
    if spec.partition(":")[0] == "imagefolder" and getattr(options, "image_cache", "off") != "off":
        from ..data import decoded

        decoded.check_cache_dir(decoded.cache_dir())


def model_meta(arch: str, data, data_spec: str, seed: int) -> dict:
    """What a saved model records about itself and the data it was trained on: enough to rebuild
    it and to read its test split again exactly as it saw it."""
    return {"arch": arch, "num_classes": data.num_classes, "input_shape": list(data.input_shape),
            "dataset": data_spec, "seed": seed, "classes": data.classes,
            "normalization": {"mean": data.mean, "std": data.std}, "data_options": data.options.record(),
            "transform": data.transform, "edgekd_version": __version__}


def epoch_line(what: str, r: dict) -> str:
    star = " *" if r.get("best") else ""
    return (f"{what} epoch {r['epoch']}: loss {r['loss']:.4f}, train acc {r['train_accuracy']:.4f}, "
            f"val acc {r['val_accuracy']:.4f} ({r['seconds']:.0f}s){star}")


def check_device(device: str) -> None:
    import torch

    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise EdgekdError(f"unknown device {device!r}", "use --device cpu or --device cuda[:N]")
    if not torch.cuda.is_available():
        raise EdgekdError(f"--device {device}: this PyTorch sees no CUDA GPU", "use --device cpu")


def join_group(opts) -> tuple[bool, bool]:
    """Check the device and join torchrun's process group, if launched so. Returns (joined it now:
    the caller shuts it down, this process is rank 0: it logs)."""
    from ..training import distributed as dd

    check_device(opts.device)
    joined = dd.init_from_env(opts.device)
    return joined, dd.is_main()
