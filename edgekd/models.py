"""Model specs -> nn.Module, and safe checkpoint save/load.

Specs: a built-in name (``cnn-teacher``, ``cnn-student``, ``resnet-student``, ``mlp-student``),
``torchvision:NAME`` (built with random weights; nothing is downloaded), ``module:callable``
(``package.module:function``, called with the keyword arguments it accepts among
``num_classes`` and ``in_channels``), or a path to an edgekd checkpoint (architecture inside).
Checkpoints are loaded with ``torch.load(weights_only=True)`` or safetensors: never unpickled.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, IncompatibleError, MissingFileError
from .registry import Registry

ARCHS: Registry = Registry("model")


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class Residual(nn.Module):
    """A basic residual block: two 3x3 conv-BN, a projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.skip(x))


def _stem_stride(image_size: int) -> int:
    """Built-in models halve images of 24 pixels or more in their first layer (4x less compute
    in every later layer on 28x28 Fashion-MNIST); 8x8 digits keep full resolution."""
    return 2 if image_size >= 24 else 1


def _head(cin: int, num_classes: int) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]


@ARCHS.register("cnn-teacher")
def cnn_teacher(num_classes: int = 10, in_channels: int = 1, width: int = 64, image_size: int = 8) -> nn.Module:
    """A residual CNN teacher (1.5M parameters at width 64) for small images.

    Images of 24 pixels or more go through a stride-2 stem (see ``_stem_stride``).
    """
    w = width
    stem = _conv_bn(in_channels, w, _stem_stride(image_size))
    return nn.Sequential(*stem, Residual(w, w), Residual(w, 2 * w, 2),
                         Residual(2 * w, 2 * w), Residual(2 * w, 4 * w, 2), *_head(4 * w, num_classes))


@ARCHS.register("cnn-student")
def cnn_student(num_classes: int = 10, in_channels: int = 1, width: int = 16, image_size: int = 8) -> nn.Module:
    """A plain 4-conv student (33k parameters at width 16), about 2% of the teacher."""
    w = width
    return nn.Sequential(*_conv_bn(in_channels, w, _stem_stride(image_size)), *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w, 2),
                         *_conv_bn(2 * w, 4 * w, 2), *_head(4 * w, num_classes))


@ARCHS.register("resnet-student")
def resnet_student(num_classes: int = 10, in_channels: int = 1, width: int = 16, image_size: int = 8) -> nn.Module:
    """A small residual student (78k parameters at width 16): exercises aligned residual adds."""
    w = width
    return nn.Sequential(*_conv_bn(in_channels, w, _stem_stride(image_size)), Residual(w, w), Residual(w, 2 * w, 2),
                         Residual(2 * w, 4 * w, 2), *_head(4 * w, num_classes))


@ARCHS.register("mlp-student")
def mlp_student(num_classes: int = 10, in_channels: int = 1, hidden: int = 128, image_size: int = 28) -> nn.Module:
    """A two-layer perceptron over the flattened image."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def random_passes(model: nn.Module, input_shape, steps: int = 3, batch: int = 16) -> nn.Module:
    """``steps`` training-mode forward passes on random batches, without gradients; returns the
    model in eval mode. For checks of untrained models: the passes set batch-norm statistics and
    the activation scales Brevitas initialises from statistics."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(batch, *input_shape))
    return model.eval()


def calibrate_batchnorm(model: nn.Module, input_shape, steps: int = 3, batch: int = 16) -> nn.Module:
    """Batch-norm running statistics as the cumulative average over ``steps`` random batches. A
    randomly initialised network with default statistics has vanishing activations (MobileNetV3's
    logits ~1e-10), which makes structural and parity checks meaningless."""
    for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        bn.reset_running_stats()
        bn.momentum = None
    return random_passes(model, input_shape, steps, batch)


def build_model(spec: str, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """Build a float model from a spec string, adapted to the dataset's channels and classes."""
    in_channels = input_shape[0]
    if spec.startswith("torchvision:"):
        return _torchvision(spec.split(":", 1)[1], num_classes, in_channels)
    if ":" in spec and not Path(spec).exists():
        return _from_callable(spec, num_classes, in_channels)
    factory = ARCHS.get(spec)
    kwargs = {"num_classes": num_classes, "in_channels": in_channels}
    if "image_size" in inspect.signature(factory).parameters:
        kwargs["image_size"] = input_shape[1]
    return factory(**kwargs)


def _torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        from .registry import unknown

        raise unknown("torchvision model", name, available)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _adapt_first_conv(model, in_channels)
    return model


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the first Conv2d in forward order (which expects RGB) by one with ``in_channels``
    inputs, its weights derived from the RGB ones (timm's ``adapt_input_conv``: summed over the
    colour channels for one input channel, repeated and rescaled otherwise).

    "First" is the first Conv2d in definition order (``named_modules``, depth first), which is the
    stem of every torchvision classifier; a breadth-first search would pick a later convolution
    that happens to sit higher in the module tree.
    """
    name, child = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if child is None:
        return
    groups = 1 if child.groups == 1 else in_channels
    conv = nn.Conv2d(in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                     child.dilation, groups, child.bias is not None, child.padding_mode)
    with torch.no_grad():
        w = child.weight
        if groups == 1 and in_channels == 1:
            conv.weight.copy_(w.sum(1, keepdim=True))
        elif groups == 1:
            reps = -(-in_channels // w.shape[1])
            conv.weight.copy_(w.repeat(1, reps, 1, 1)[:, :in_channels] * (w.shape[1] / in_channels))
        if child.bias is not None:
            conv.bias.copy_(child.bias)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, conv)


def _from_callable(spec: str, num_classes: int, in_channels: int) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot load model callable {spec!r}: {e}", "use the form package.module:function") from None
    accepted = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if k in accepted}
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- checkpoints ---------------------------------------------------------------------------------

def save_checkpoint(path: Path, state_dict: dict, meta: dict) -> None:
    """Save tensors and JSON-like metadata in a file that loads with weights_only=True."""
    from .fsutil import atomic_path

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
        from .errors import MissingExtraError

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
