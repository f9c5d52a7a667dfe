"""Model specs -> nn.Module, adapted to the dataset's channels and classes.

Specs: a built-in name (``cnnfc-teacher``, ``cnnfc-student``, ``cnn-teacher``, ``cnn-student``,
``resnet-student``, ``mlp-student``),
``torchvision:NAME`` or ``timm:NAME`` (built with random weights; nothing is downloaded; timm is the
extra ``edgekd[timm]``) or ``module:callable`` (``package.module:function``, called with the keyword
arguments it accepts among ``num_classes`` and ``in_channels``). Any of them may carry a weights
file, ``ARCH=WEIGHTS`` (models.weights.from_spec loads it). A spec that names code
(``module:callable``) is built only when the caller says it comes from the user (the command line
or the Python API, ``trusted=True``): a spec read from a file (checkpoint metadata, recipe,
manifest) may name only built-in, torchvision and timm models.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch
from torch import nn

from ..core.errors import ConfigError
from .zoo import ARCHS

SAFE_PREFIXES = ("torchvision:", "timm:")  # specs with a colon that name no code
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


class UntrustedCodeError(ConfigError):
    """A file names code (``module:callable``) that only the command line or the API may name."""


def names_code(spec) -> bool:
    """Whether building ``spec`` would import a module and call a function of it."""
    return isinstance(spec, str) and ":" in spec and not spec.startswith(SAFE_PREFIXES)


def refuse_code(spec: str, source: str, how: str) -> UntrustedCodeError:
    """The one line for ``source`` (a file, or a key of one) naming code; ``how``: the command-line
    spelling that names it on purpose (``--student mypkg.nets:make``)."""
    return UntrustedCodeError(f"{source} names the model '{spec}', which is code (module:callable); a file may name "
                              "only built-in and torchvision: architectures",
                              f"to run it, name it on the command line ({how}) or pass --trust-code")


def check_trusted(spec, source: str, how: str, trusted: bool) -> None:
    """Raise ``refuse_code`` when an untrusted ``spec`` names code."""
    if not trusted and names_code(spec):
        raise refuse_code(spec, source, how)


def split_weights(spec: str) -> tuple[str | None, str | None]:
    """(architecture, weights file) of a model spec: ``ARCH=WEIGHTS`` gives both, an existing file
    or a path-like spec (``.pt``, ``.pth``, ``.bin``, ``.safetensors``, a ``/``) only the file (an
    edgekd checkpoint names its architecture), anything else only the architecture. An empty spec
    is an error (Path("") is the current directory: it would read as a file)."""
    if not isinstance(spec, str) or not spec.strip():
        from ..config.options import shown

        raise ConfigError(f"model spec {shown(spec)} is empty: it names no architecture and no file",
                          "give a built-in name (e.g. cnnfc-student), torchvision:NAME, module:callable or a checkpoint")
    if Path(spec).exists() or ("=" not in spec and (spec.endswith(WEIGHT_SUFFIXES) or "/" in spec)):
        return None, spec
    arch, sep, weights = spec.partition("=")
    if sep and not (arch.strip() and weights.strip()):
        raise ConfigError(f"model spec {spec!r}: ARCH=WEIGHTS needs both an architecture and a weights file",
                          "e.g. torchvision:resnet18=teacher.pth or mypkg.nets:make=weights.pt")
    if sep:
        return arch, weights
    return spec, None


def build_model(spec: str, num_classes: int, input_shape: tuple[int, int, int], trusted: bool = True) -> nn.Module:
    """Build a float model from a spec string, adapted to the dataset's channels and classes.

    ``trusted``: the spec comes from the command line or the Python API (the default: this is the
    API). A spec read from a file is built with ``trusted=False``: naming code then raises."""
    in_channels = input_shape[0]
    if spec.startswith("torchvision:"):
        return _torchvision(spec.split(":", 1)[1], num_classes, in_channels)
    if spec.startswith("timm:"):
        return _timm(spec.split(":", 1)[1], num_classes, in_channels)
    if ":" in spec and not Path(spec).exists():
        check_trusted(spec, f"the model spec {spec!r}", spec, trusted)
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
        from ..core.registry import unknown

        raise unknown("torchvision model", name, available)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _adapt_first_conv(model, in_channels)
    return model


def _timm(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A timm model with random weights (nothing is downloaded: ``pretrained=False``); timm adapts the
    stem to ``in_channels`` itself."""
    try:
        import timm
    except ImportError:
        from ..core.errors import MissingExtraError

        raise MissingExtraError("timm", "timm", f"the model timm:{name}") from None
    if not timm.is_model(name):
        from ..core.registry import unknown

        raise unknown("timm model", name, timm.list_models())
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)


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
