"""Normalization as an input: ``--normalize auto`` (the training split's per-channel statistics),
``imagenet``, ``none``, or ``MEAN/STD`` with comma-separated per-channel values."""

from __future__ import annotations

import math
from typing import Callable

from ..core.errors import ConfigError

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # torchvision's pretrained weights
CHOICES = ("auto", "imagenet", "none", "MEAN/STD")


def resolve_normalization(spec: str, channels: int,
                          stats: Callable[[], tuple[list[float], list[float]]]) -> tuple[list[float], list[float]]:
    """(mean, std) per channel for ``spec``; ``stats`` computes the training split's (for auto).

    ``imagenet`` on one-channel images takes the average of the three channels' values (what
    timm's and torchvision's grayscale adaptations of RGB weights assume)."""
    spec = (spec or "auto").strip()
    if spec == "auto":
        return stats()
    if spec == "none":
        return [0.0] * channels, [1.0] * channels
    if spec == "imagenet":
        mean, std = IMAGENET
        if channels == 1:
            return [round(sum(mean) / 3, 6)], [round(sum(std) / 3, 6)]
        return (mean, std) if channels == 3 else _refuse(spec, channels)
    return _explicit(spec, channels)


def _explicit(spec: str, channels: int) -> tuple[list[float], list[float]]:
    mean_text, sep, std_text = spec.partition("/")
    try:
        mean, std = [float(v) for v in mean_text.split(",")], [float(v) for v in std_text.split(",")]
    except ValueError:
        mean = std = None
    if not sep or mean is None:
        raise ConfigError(f"--normalize must be auto, imagenet, none or MEAN/STD, got {spec!r}",
                          "e.g. --normalize 0.5,0.5,0.5/0.25,0.25,0.25")
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(f"--normalize {spec} gives {len(mean)} means and {len(std)} stds for {channels}-channel "
                          "images", f"give {channels} comma-separated values on each side of the /")
    if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise ConfigError(f"--normalize {spec}: means must be finite and stds finite and > 0")
    return mean, std


def _refuse(spec: str, channels: int):
    raise ConfigError(f"--normalize {spec} is defined for 1 or 3 channels, the data has {channels}",
                      "give MEAN/STD explicitly")
