"""The budget of ``distill --bits auto`` (quant.autobits): ``--budget size=SIZE`` or a profile's size budget.

``size=SIZE``: the bytes of the student's quantized weights, each layer's weights packed at its bit
width (ceil(parameters x bits / 8) per layer, summed), the quantity that changes with the choice of
bits. Biases, scales and the graph come on top and are the same for every choice. SIZE is a number
with a unit: B, KB, MB, GB (10**3, 10**6, 10**9 bytes, as bench's size_mb) or KiB, MiB, GiB.

``--profile P`` takes the profile's ``[budgets] size_mb`` (MB = 10**6 bytes) as that budget. Bench
holds size_mb against the model file on disk, which also stores biases, scales and the graph, and
on int8 runtimes (the qdq flavour) stores every weight as int8 whatever its grid: the packed size is
what bit-packed stores (FPGA on-chip memory, FINN/hls4ml) hold, not what a qdq model.onnx weighs.

Latency budgets are refused (LATENCY_REFUSED): on int8 runtimes (ONNX Runtime, TensorRT) weights of 2
to 8 bits all run on the same int8 kernels, so latency does not depend on the choice among them,
and edgekd does not invent a latency model. No torch here: it parses and checks only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from ..core.errors import ConfigError
from ..core.registry import suggest

KEYS = ("size", "latency")
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
MAX_BYTES = 10**12  # 1 TB of weights: beyond any student edgekd trains
EXAMPLE = "e.g. --budget size=20KB or --budget size=1.5MB"
_SIZE = re.compile(r"(\d{1,15}(?:\.\d{0,12})?|\.\d{1,12})\s*([A-Za-z]{0,3})")
LATENCY_REFUSED = ("--budget latency= is not supported: on int8 runtimes (ONNX Runtime, TensorRT) weights of 2 to 8 "
                   "bits all run on the same int8 kernels, so the choice of bits does not change latency, and edgekd "
                   "does not make up a latency model")
LATENCY_FIX = "give --budget size=SIZE, and time the exported bundle with 'edgekd bench --profile P'"


@dataclass(frozen=True)
class Budget:
    """A size budget in bytes of packed weights; ``text`` as given, ``label`` how messages name it."""

    size_bytes: int
    text: str
    label: str = ""

    def __post_init__(self):
        object.__setattr__(self, "label", self.label or f"--budget {self.text}")

    def to_dict(self) -> dict:
        return {"size_bytes": self.size_bytes, "text": self.text, "from": self.label}


def human(n: float) -> str:
    """Bytes as a short decimal size: 980 B, 20.5 KB, 1.50 MB."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if n / scale < 100 else f"{n / scale:.0f} {unit}"
    return f"{int(n)} B"


def parse_size(text: str, where: str = "--budget size") -> int:
    """``20KB``, ``1.5 MB``, ``512KiB`` -> bytes (rounded down); one ConfigError naming what is wrong."""
    m = _SIZE.fullmatch(str(text).strip())
    unit = m.group(2).lower() if m else ""
    if not m or unit not in UNITS:
        got = f"unknown unit {m.group(2)!r}" if m and unit else "no unit" if m else f"got {str(text)[:40]!r}"
        raise ConfigError(f"{where}: SIZE must be a positive number with a unit B, KB, MB, GB, KiB, MiB or GiB, "
                          f"{got}", EXAMPLE)
    value = int(Fraction(m.group(1)) * UNITS[unit])
    if value < 1 or value > MAX_BYTES:
        raise ConfigError(f"{where}: SIZE must be between 1 B and {human(MAX_BYTES)}, got {m.group(0)}", EXAMPLE)
    return value


def parse(text, label: str = "--budget") -> Budget:
    """``size=SIZE`` -> a Budget. Unknown or repeated keys, ``latency=`` and bad sizes: one ConfigError."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{label} must be size=SIZE, got {str(text)[:40]!r}", EXAMPLE)
    size = None
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in KEYS:
            raise ConfigError(f"{label} {item.strip()[:40]!r}: expected size=SIZE"
                              + (suggest(key, KEYS) if sep else ""), EXAMPLE)
        if key == "latency":
            raise ConfigError(LATENCY_REFUSED, LATENCY_FIX)
        if size is not None:
            raise ConfigError(f"{label} gives size twice", "give one size=SIZE")
        size = parse_size(value, f"{label} size={value.strip()[:40]}")
    return Budget(size, text.strip())


def from_profile(name: str) -> Budget:
    """The size budget of profile ``name`` (its ``[budgets] size_mb``), or one error when it has none."""
    from .. import catalog

    profile = catalog.load_profile(name)
    mb = profile.budgets.size_mb
    if mb is None:
        raise ConfigError(f"profile {profile.name} has no size budget ([budgets] size_mb)",
                          "give the budget with --budget size=SIZE")
    return Budget(int(Fraction(str(mb)) * 10**6), f"size={mb:g}MB", f"the size budget of profile {profile.name} "
                                                                     f"(size_mb = {mb:g})")


def request(opts) -> Budget | None:
    """The budget ``opts`` ask ``--bits auto`` to meet (None without auto bits); a budget without
    auto bits, auto bits without a budget, both --budget and --profile: one ConfigError each."""
    budget, profile = getattr(opts, "budget", None), getattr(opts, "profile", None)
    if not getattr(opts, "auto_bits", False):
        if budget is not None or profile is not None:
            given = "--budget" if budget is not None else "--profile"
            raise ConfigError(f"{given} sets the size budget of --bits auto, which was not asked",
                              f"add --bits auto, or drop {given}")
        return None
    if budget is not None and profile is not None:
        raise ConfigError("--bits auto takes its budget from --budget or from --profile, not both", "drop one")
    if budget is None and profile is None:
        raise ConfigError("--bits auto needs a budget to choose bits under",
                          "add --budget size=SIZE (e.g. size=20KB) or --profile P (its size_mb budget)")
    if opts.scheme in ("progressive", "born-again"):
        raise ConfigError(f"--bits auto chooses bits once, after the float phase; --scheme {opts.scheme} trains "
                          "several quantized students", "use --scheme offline, dml or assistant with --bits auto")
    return parse(budget) if budget is not None else from_profile(profile)
