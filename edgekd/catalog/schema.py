"""The schema of targets and device profiles: frozen dataclasses, and the checks of every TOML key.

A target says how to produce and run an artifact (backend, export flavour, bits, tolerance).
A profile says what a device is and how to benchmark it (hardware facts, settings, budgets).
One file per entry under targets/ and profiles/; the file stem is the name. Users may pass a
path to their own .toml wherever a name is accepted. This module must not import torch
(bench runs on devices without it).

Target schema (every key optional unless marked required)::

    description = "..."
    aliases = ["jetson"]                 # short names, unique across the whole catalog
    backend = "tensorrt"                 # required: onnxruntime | tensorrt | qonnx
    flavour = "qdq"                      # required: one of the backend's flavours (qcdq | qdq | qonnx)
    opset = 13                           # ONNX opset of the standard ops (per-axis Q/DQ needs >= 13)
    weight_bits = [2, 3, 4, 5, 6, 7, 8]  # widths the runtime ACCEPTS (runs correctly)
    act_bits = [8]
    accelerated_weight_bits = [8]        # widths the runtime COMPUTES natively; a narrower
    accelerated_act_bits = [8]           #   accepted width runs with these kernels (no gain).
                                         #   Default: same as the accepted list.
    [tolerance]                          # parity of the exported artifact vs PyTorch
    min_top1_agreement = 0.99            #   fraction of samples whose argmax matches
    max_abs_diff = 0.5                   #   optional bound on |logit_runtime - logit_torch|
    [quant]                              # conventions fixed at training time (distill --target)
    weight_scaling = "per_channel"       #   per_channel | per_tensor
    scale_type = "float"                 #   float | po2 (power-of-two scales)
    act_after_relu = "signed"            #   unsigned | signed (zero point 0 either way)
    bias = "float"                       #   int32 (scale = input * weight scale) | float
    first_last_bits = 8                  #   first and last layer bits, or "same" (as the rest)
    [options]                            # backend settings, checked against the backend's options

Profile schema::

    description = "..."
    aliases = ["pi5"]
    targets = ["onnxruntime-arm"]        # required: catalog names/aliases or .toml paths,
                                         #   preferred first
    [hardware]                           # facts from data sheets, checked against HARDWARE_KEYS
    [hardware.cpu] / [hardware.accelerator] / [hardware.fpga] / [hardware.software]
    [bench]    threads (0: runtime decides), warmup, warmup_s, iterations, min_time_s, batch_sizes
    [budgets]  latency_ms, latency_percentile (p50|p90|p95|p99|mean), size_mb, peak_rss_mb,
               min_accuracy (fraction)
    [clocks]   what `bench --host --set-clocks` applies for the run (then restores): governor
               (a cpufreq governor, or "keep"), jetson_clocks (bool), nvpmodel (a power mode ID,
               or its name in the device's /etc/nvpmodel.conf)

Names: ``load_target`` accepts a target name, a target alias, a profile name or alias (meaning
that profile's preferred target, so ``--target rpi5`` works) or a path to a .toml file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..config import options as op
from ..core.errors import ConfigError
from ..core.registry import suggest

MIN_BITS, MAX_BITS = op.MIN_BITS, op.MAX_BITS
PERCENTILES = ("p50", "p90", "p95", "p99", "mean")
MAX_BATCH_SIZES = 16  # batch sizes one bench run times (each one is a row per bundle)


# --- dataclasses ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    min_top1_agreement: float = 0.999  # fraction of samples whose argmax matches PyTorch's
    max_abs_diff: float | None = None  # optional bound on |logit_runtime - logit_torch|


@dataclass(frozen=True)
class Conventions:
    """How the runtime wants quantizers, fixed at training time (distill --target)."""

    weight_scaling: str = "per_channel"  # per_channel | per_tensor
    scale_type: str = "float"  # float | po2 (power-of-two scales)
    act_after_relu: str = "unsigned"  # unsigned | signed (TensorRT: signed int8, zero point 0)
    bias: str = "int32"  # int32 (quantized with input*weight scale) | float
    first_last_bits: int | str = 8  # keep first and last layer at this many bits; "same": as the rest
    # reduce_range: weights use at most 7 bits. ORT's u8s8 int8 kernels on x86 CPUs without VNNI
    # (AVX2, AVX-512F) add pairs of u8*s8 products in int16 (vpmaddubsw), which saturates with
    # full 8-bit weights (2*255*127 > 32767); ORT's own quantizer offers reduce_range for this.
    reduce_range: bool = False


@dataclass(frozen=True)
class Target:
    name: str
    backend: str
    flavour: str
    description: str = ""
    aliases: tuple[str, ...] = ()
    opset: int = 13
    weight_bits: tuple[int, ...] = (8,)  # bit widths this target accepts
    act_bits: tuple[int, ...] = (8,)
    accelerated_weight_bits: tuple[int, ...] = ()  # widths computed natively; () = all accepted
    accelerated_act_bits: tuple[int, ...] = ()
    tolerance: Tolerance = field(default_factory=Tolerance)
    quant: Conventions = field(default_factory=Conventions)
    options: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    def accelerated(self, kind: str) -> tuple[int, ...]:
        """Accelerated widths for kind 'weight' or 'act' (the accepted list when not declared)."""
        return getattr(self, f"accelerated_{kind}_bits") or getattr(self, f"{kind}_bits")


@dataclass(frozen=True)
class BenchSettings:
    """How bench times a bundle (defaults and bounds: edgekd.config.options)."""

    threads: int = op.default("threads")  # 0: let the runtime decide
    warmup: int = op.default("warmup")
    warmup_s: float = op.default("warmup_s")
    iterations: int = op.default("iterations")
    min_time_s: float = op.default("min_time_s")
    batch_sizes: tuple[int, ...] = op.default("batch_sizes")


@dataclass(frozen=True)
class Budgets:
    latency_ms: float | None = None
    latency_percentile: str = "p90"
    size_mb: float | None = None
    peak_rss_mb: float | None = None
    min_accuracy: float | None = None


@dataclass(frozen=True)
class Clocks:
    """Clock settings ``bench --host --set-clocks`` applies on the device (never without it)."""

    governor: str = "performance"  # cpufreq governor of every CPU; "keep": leave it
    jetson_clocks: bool = True  # on a Jetson: lock clocks at the power mode's maximum
    nvpmodel: int | str | None = None  # Jetson power mode ID or name; None: leave it


GOVERNORS = ("performance", "schedutil", "ondemand", "conservative", "powersave", "userspace", "keep")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    aliases: tuple[str, ...] = ()
    hardware: dict[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] = ()
    bench: BenchSettings = field(default_factory=BenchSettings)
    budgets: Budgets = field(default_factory=Budgets)
    clocks: Clocks = field(default_factory=Clocks)
    path: str = ""


_NUM = (int, float)
HARDWARE_KEYS: dict[str, Any] = {
    "arch": str, "soc": str, "board": str, "memory_gb": _NUM, "memory": str, "power_w": (list, int, float),
    "notes": str, "sources": list, "extra": dict,
    "cpu": {"model": str, "cores": int, "max_freq_ghz": _NUM, "isa": str, "features": list, "cache": str},
    "accelerator": {"kind": str, "model": str, "cuda_cores": int, "tensor_cores": int, "max_freq_mhz": _NUM,
                    "dla_cores": int, "int8_tops_sparse": _NUM, "int8_tops_dense": _NUM, "notes": str},
    "fpga": {"part": str, "family": str, "system_logic_cells": int, "lut": int, "ff": int, "bram_36k": int,
             "bram_mbit": _NUM, "uram": int, "uram_mbit": _NUM, "dsp": int, "finn_board": str},
    "software": {"jetpack": str, "jetson_linux": str, "tensorrt": str, "cuda": str, "cudnn": str, "os": str,
                 "notes": str},
}
ACCELERATOR_KINDS = ("none", "gpu", "fpga", "npu")


# --- low-level validation -------------------------------------------------------------------------


def _check_keys(table: dict, allowed, where: str) -> None:
    allowed = list(allowed)
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}{suggest(key, allowed)}",
                              f"allowed keys: {', '.join(allowed)}")


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _type_name(expected: tuple) -> str:
    return "number" if set(expected) == {int, float} else "/".join(t.__name__ for t in expected)


def _typed(value, expected, key: str, where: str):
    """Return value if it has the expected type (a bool is not an int here unless bool is expected)."""
    expected = _tuple(expected)
    if (isinstance(value, bool) and bool not in expected) or not isinstance(value, expected):
        raise ConfigError(f"{where}: key {key!r} must be {_type_name(expected)}, "
                          f"got {type(value).__name__} {value!r}")
    return value


def _typed_list(value, item, key: str, where: str) -> tuple:
    _typed(value, list, key, where)
    for v in value:
        if isinstance(v, bool) or not isinstance(v, item):
            raise ConfigError(f"{where}: every item of {key!r} must be {item.__name__}, got {v!r}")
    return tuple(value)


def _check_choice(value: str, choices, key: str, where: str) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(choices)}, got {value!r}{suggest(value, choices)}")


def _check_range(value, key: str, where: str, lo=None, hi=None, lo_open=False) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        bound = f"{'>' if lo_open else '>='} {lo}" if hi is None else f"in {lo}..{hi}"
        raise ConfigError(f"{where}: {key} must be {bound}, got {value!r}")


_TYPES: dict[type, dict[str, Any]] = {
    Conventions: {"weight_scaling": str, "scale_type": str, "act_after_relu": str, "bias": str,
                  "reduce_range": bool,
                  "first_last_bits": (int, str)},
    Tolerance: {"min_top1_agreement": _NUM, "max_abs_diff": _NUM},
    Target: {"backend": str, "flavour": str, "description": str, "aliases": str, "opset": int,
             "weight_bits": int, "act_bits": int, "accelerated_weight_bits": int, "accelerated_act_bits": int,
             "options": dict},
    BenchSettings: {"threads": int, "warmup": int, "warmup_s": _NUM, "iterations": int,
                    "min_time_s": _NUM, "batch_sizes": int},
    Budgets: {"latency_ms": _NUM, "latency_percentile": str, "size_mb": _NUM,
              "peak_rss_mb": _NUM, "min_accuracy": _NUM},
    Profile: {"description": str, "aliases": str, "hardware": dict, "targets": str},
    Clocks: {"governor": str, "jetson_clocks": bool, "nvpmodel": (int, str)},
}
_LISTS = {"aliases", "weight_bits", "act_bits", "accelerated_weight_bits", "accelerated_act_bits",
          "batch_sizes", "targets"}


def _build(cls, table: dict, where: str, **extra):
    """Check keys and types of one TOML table and build the dataclass (lists become tuples)."""
    _check_keys(table, _TYPES[cls], where)
    kwargs = {}
    for key, value in table.items():
        if key in _LISTS:
            kwargs[key] = _typed_list(value, _TYPES[cls][key], key, where)
        else:
            kwargs[key] = _typed(value, _TYPES[cls][key], key, where)
    return cls(**kwargs, **extra)


def _subtable(table: dict, key: str, where: str) -> dict:
    return _typed(table.pop(key, {}), dict, key, where)


def bits_text(bits) -> str:
    """(2, 3, 4, 5, 6, 7, 8) -> '2-8'; (2, 4, 8) -> '2,4,8'."""
    bits = sorted(bits)
    if len(bits) > 2 and bits == list(range(bits[0], bits[-1] + 1)):
        return f"{bits[0]}-{bits[-1]}"
    return ",".join(map(str, bits))


# --- targets ----------------------------------------------------------------------------------------


def _parse_conventions(table: dict, where: str) -> Conventions:
    conv = _build(Conventions, table, where)
    _check_choice(conv.weight_scaling, ("per_channel", "per_tensor"), "quant.weight_scaling", where)
    _check_choice(conv.scale_type, ("float", "po2"), "quant.scale_type", where)
    _check_choice(conv.act_after_relu, ("unsigned", "signed"), "quant.act_after_relu", where)
    _check_choice(conv.bias, ("int32", "float"), "quant.bias", where)
    op.check("first_last_bits", conv.first_last_bits, f"{where}: quant.first_last_bits")
    return conv


def _parse_tolerance(table: dict, where: str) -> Tolerance:
    tol = _build(Tolerance, table, where)
    _check_range(tol.min_top1_agreement, "tolerance.min_top1_agreement", where, 0, 1, lo_open=True)
    _check_range(tol.max_abs_diff, "tolerance.max_abs_diff", where, 0, lo_open=True)
    return tol


def _check_bits(target: Target, where: str) -> None:
    for key in ("weight_bits", "act_bits", "accelerated_weight_bits", "accelerated_act_bits"):
        bits = getattr(target, key)
        if (not bits and not key.startswith("accelerated")) or any(not MIN_BITS <= b <= MAX_BITS for b in bits):
            raise ConfigError(f"{where}: {key} must be a non-empty list of integers in "
                              f"{MIN_BITS}..{MAX_BITS}, got {list(bits)}")
    for kind in ("weight", "act"):
        extra = sorted(set(target.accelerated(kind)) - set(getattr(target, f"{kind}_bits")))
        if extra:
            raise ConfigError(f"{where}: accelerated_{kind}_bits {extra} are not in {kind}_bits",
                              "a width the runtime accelerates must also be accepted")
    flb = target.quant.first_last_bits
    if flb != op.SAME and (flb not in target.weight_bits or flb not in target.act_bits):
        raise ConfigError(f"{where}: quant.first_last_bits = {flb} is not accepted by this target",
                          "use a width listed in both weight_bits and act_bits, or \"same\" for the rest's bits")


def check_options(options: dict, backend: str, where: str) -> None:
    """A target's [options] (or a bundle's ``backend_options``), checked against the schema its
    backend declares; an option naming a file (``file_name``) must be a plain name, never a path
    that leads out of the folder it is written in."""
    from ..backends import get_backend

    specs = get_backend(backend).options
    _check_keys(options, specs, f"{where} [options] ({backend})")
    for key, value in options.items():
        spec = specs[key]
        _typed(value, spec.kind, f"options.{key}", where)
        if spec.choices:
            _check_choice(value, spec.choices, f"options.{key}", where)
        _check_range(value, f"options.{key}", where, spec.lo, spec.hi)
        if getattr(spec, "file_name", False) and value and (value in (".", "..") or "/" in value or "\\" in value
                                                             or "\0" in value):
            raise ConfigError(f"{where}: options.{key} must be a file name (no folders), got {value!r}",
                              "give a plain file name: it is written next to the artifact")


_check_options = check_options


def parse_target(table: dict, name: str, where: str) -> Target:
    table = dict(table)
    tol = _parse_tolerance(_subtable(table, "tolerance", where), where + " [tolerance]")
    conv = _parse_conventions(_subtable(table, "quant", where), where + " [quant]")
    _check_keys(table, _TYPES[Target], where)  # typos first, so a misspelt required key gets a suggestion
    for key in ("backend", "flavour"):
        if key not in table:
            raise ConfigError(f"{where}: missing required key {key!r}")
    target = _build(Target, table, where, name=name, path=where, tolerance=tol, quant=conv)
    backend = _backend(target.backend, where)
    if target.flavour not in backend.flavours:
        raise ConfigError(f"{where}: flavour {target.flavour!r} is not supported by backend {target.backend!r}"
                          f"{suggest(target.flavour, backend.flavours)}", f"choose one of: {', '.join(backend.flavours)}")
    _check_range(target.opset, "opset", where, backend.opset_min, 23)
    _check_bits(target, where)
    _check_options(target.options, target.backend, where)
    return target

def _backend(name: str, where: str):
    from ..backends import backend_names, get_backend

    if name not in backend_names():
        raise ConfigError(f"{where}: unknown backend {name!r}{suggest(name, backend_names())}",
                          f"choose one of: {', '.join(backend_names())}")
    return get_backend(name)


# --- profiles ---------------------------------------------------------------------------------------


def _check_hardware(table: dict, where: str, schema=HARDWARE_KEYS, prefix="hardware") -> None:
    _check_keys(table, schema, f"{where} [{prefix}]")
    for key, value in table.items():
        expected = schema[key]
        if isinstance(expected, dict):
            _check_hardware(_typed(value, dict, f"{prefix}.{key}", where), where, expected, f"{prefix}.{key}")
        else:
            _typed(value, expected, f"{prefix}.{key}", where)
            if expected is _NUM or expected is int:
                _check_range(value, f"{prefix}.{key}", where, 0)
    if prefix == "hardware.accelerator" and "kind" in table:
        _check_choice(table["kind"], ACCELERATOR_KINDS, "hardware.accelerator.kind", where)


def check_bench(bench: BenchSettings, where: str) -> None:
    """The same bounds as the bench options of the command line (edgekd.config.options), and at
    most MAX_BATCH_SIZES distinct batch sizes. ``where`` prefixes each key ("" for none)."""
    for key in ("threads", "warmup", "warmup_s", "iterations", "min_time_s", "batch_sizes"):
        op.check(key, getattr(bench, key), f"{where}: {key}" if where else None)
    prefix = f"{where}: " if where else ""
    if not bench.batch_sizes:
        raise ConfigError(f"{prefix}batch_sizes must be a non-empty list of positive integers")
    if len(bench.batch_sizes) > MAX_BATCH_SIZES:
        raise ConfigError(f"{prefix}{len(bench.batch_sizes)} batch sizes given, at most "
                          f"{MAX_BATCH_SIZES} are benched in one run", "give fewer batch sizes")


_check_bench = check_bench  # the name loading.py imports


def _check_clocks(clocks: Clocks, where: str) -> None:
    _check_choice(clocks.governor, GOVERNORS, "governor", where)
    if isinstance(clocks.nvpmodel, int):
        _check_range(clocks.nvpmodel, "nvpmodel", where, 0)
    elif clocks.nvpmodel is not None and not clocks.nvpmodel.strip():
        raise ConfigError(f"{where}: nvpmodel must be a power mode ID or name, got {clocks.nvpmodel!r}")


def _check_budgets(budgets: Budgets, where: str) -> None:
    _check_choice(budgets.latency_percentile, PERCENTILES, "latency_percentile", where)
    for key in ("latency_ms", "size_mb", "peak_rss_mb"):
        _check_range(getattr(budgets, key), key, where, 0, lo_open=True)
    _check_range(budgets.min_accuracy, "min_accuracy", where, 0, 1)

