"""Targets and device profiles: TOML files -> frozen, validated dataclasses.

A target says how to produce and run an artifact (backend, export flavour, bits, tolerance).
A profile says what a device is and how to benchmark it (hardware facts, settings, budgets).
One file per entry under targets/ and profiles/; the file stem is the name. Users may pass a
path to their own .toml wherever a name is accepted. This module must not import torch
(bench runs on devices without it).

Target schema (every key optional unless marked required)::

    description = "..."
    aliases = ["jetson"]                 # short names, unique across the whole catalog
    backend = "tensorrt"                 # required: onnxruntime | tensorrt | qonnx
    flavour = "qdq"                      # required: qcdq | qdq | qonnx (see FLAVOURS_BY_BACKEND)
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
    first_last_bits = 8                  #   first and last layer bits; 0: same as the rest
    [options]                            # backend settings, checked against BACKEND_OPTIONS

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

Names: ``load_target`` accepts a target name, a target alias, a profile name or alias (meaning
that profile's preferred target, so ``--target rpi5`` works) or a path to a .toml file.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import ConfigError, IncompatibleError, MissingFileError, UnknownNameError
from .registry import suggest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BACKENDS = ("onnxruntime", "tensorrt", "qonnx")
FLAVOURS = ("qcdq", "qdq", "qonnx")
FLAVOURS_BY_BACKEND = {"onnxruntime": ("qcdq", "qdq"), "tensorrt": ("qdq", "qcdq"), "qonnx": ("qonnx",)}
MIN_BITS, MAX_BITS = 2, 8  # what edgekd trains
PERCENTILES = ("p50", "p90", "p95", "p99", "mean")
LEVELS = ("error", "warning", "info")


def data_dir(kind: str) -> Path:
    """Where the shipped catalog lives: inside the wheel, or the repo folder in a checkout."""
    packaged = Path(__file__).parent / "_data" / kind
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / kind


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
    first_last_bits: int | None = 8  # keep first and last layer at this many bits; None: same as the rest
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
    threads: int = 0  # 0: let the runtime decide
    warmup: int = 10
    warmup_s: float = 0.2
    iterations: int = 100
    min_time_s: float = 1.0
    batch_sizes: tuple[int, ...] = (1,)


@dataclass(frozen=True)
class Budgets:
    latency_ms: float | None = None
    latency_percentile: str = "p90"
    size_mb: float | None = None
    peak_rss_mb: float | None = None
    min_accuracy: float | None = None


@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    aliases: tuple[str, ...] = ()
    hardware: dict[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] = ()
    bench: BenchSettings = field(default_factory=BenchSettings)
    budgets: Budgets = field(default_factory=Budgets)
    path: str = ""


# --- capabilities as data: backend options and hardware keys -------------------------------------


@dataclass(frozen=True)
class Option:
    """One backend option: its type, allowed values and what it does."""

    kind: type | tuple
    help: str
    choices: tuple = ()
    lo: float | None = None
    hi: float | None = None


ORT_LEVELS = ("disabled", "basic", "extended", "all")  # as edgekd.backends.onnxruntime.LEVELS
BACKEND_OPTIONS: dict[str, dict[str, Option]] = {
    "onnxruntime": {
        "graph_optimization_level": Option(
            str, "level of the optimized model export saves in the bundle; the device session applies 'all' "
            "at load time (Q/DQ -> QLinearConv fusion happens at 'extended' or above)", ORT_LEVELS),
        "execution_provider": Option(str, "ONNX Runtime execution provider (default CPUExecutionProvider)"),
        "x64_exact_int8": Option(bool, "store session.x64quantprecision=1 in the model: exact int8 accumulation "
                                 "(U8U8 kernels) on x86 CPUs without VNNI, as ARM's dot-product kernels compute; "
                                 "no effect on ARM"),
        "ort_format": Option(bool, "also convert to ORT format (model.ort, what minimal/mobile ORT builds load); "
                             "the bundle then runs model.ort"),
        "ort_platform": Option(str, "platform the ORT format file is for (sets session.qdqisint8allowed)",
                               ("arm64", "x86_64")),
    },
    "tensorrt": {
        "workspace_mb": Option(int, "builder workspace memory pool limit (MemoryPoolType.WORKSPACE)", lo=1),
        "builder_optimization_level": Option(int, "IBuilderConfig.builder_optimization_level (TensorRT >= 8.6)",
                                             lo=0, hi=5),
        "timing_cache": Option(str, "timing cache file name next to the engine; '' disables it"),
        "dla_core": Option(int, "DLA core to build for; -1: GPU only", lo=-1, hi=1),
        "gpu_fallback": Option(bool, "let layers the DLA cannot run fall back to the GPU"),
        "fp16": Option(bool, "layers outside Q/DQ pairs may run in FP16 instead of FP32"),
        "engine_build": Option(str, "where the engine is built; engines do not move between GPUs or versions",
                               ("device", "export")),
    },
    "qonnx": {
        "cleanup": Option(bool, "run qonnx.util.cleanup (shape inference, constant folding) on export"),
        "toolflow": Option(str, "the FPGA compiler the QONNX file is meant for", ("finn", "hls4ml")),
    },
}

# [hardware] keys: a type, or a dict for a nested table. 'extra' is a free-form escape hatch.
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
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        bound = f"{'>' if lo_open else '>='} {lo}" if hi is None else f"in {lo}..{hi}"
        raise ConfigError(f"{where}: {key} must be {bound}, got {value!r}")


_TYPES: dict[type, dict[str, Any]] = {
    Conventions: {"weight_scaling": str, "scale_type": str, "act_after_relu": str, "bias": str,
                  "reduce_range": bool,
                  "first_last_bits": int},
    Tolerance: {"min_top1_agreement": _NUM, "max_abs_diff": _NUM},
    Target: {"backend": str, "flavour": str, "description": str, "aliases": str, "opset": int,
             "weight_bits": int, "act_bits": int, "accelerated_weight_bits": int, "accelerated_act_bits": int,
             "options": dict},
    BenchSettings: {"threads": int, "warmup": int, "warmup_s": _NUM, "iterations": int,
                    "min_time_s": _NUM, "batch_sizes": int},
    Budgets: {"latency_ms": _NUM, "latency_percentile": str, "size_mb": _NUM,
              "peak_rss_mb": _NUM, "min_accuracy": _NUM},
    Profile: {"description": str, "aliases": str, "hardware": dict, "targets": str},
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


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise MissingFileError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise MissingFileError(f"not a file: {path}", "pass a catalog name or a .toml file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})", "fix the syntax of the file") from None


# --- targets ----------------------------------------------------------------------------------------


def _parse_conventions(table: dict, where: str) -> Conventions:
    conv = _build(Conventions, table, where)
    _check_choice(conv.weight_scaling, ("per_channel", "per_tensor"), "quant.weight_scaling", where)
    _check_choice(conv.scale_type, ("float", "po2"), "quant.scale_type", where)
    _check_choice(conv.act_after_relu, ("unsigned", "signed"), "quant.act_after_relu", where)
    _check_choice(conv.bias, ("int32", "float"), "quant.bias", where)
    if conv.first_last_bits == 0:  # TOML has no null: 0 means "same bits as the rest"
        return dataclasses.replace(conv, first_last_bits=None)
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
    if flb is not None and (flb not in target.weight_bits or flb not in target.act_bits):
        raise ConfigError(f"{where}: quant.first_last_bits = {flb} is not accepted by this target",
                          "use a width listed in both weight_bits and act_bits, or 0 for 'same as the rest'")


def _check_options(options: dict, backend: str, where: str) -> None:
    specs = BACKEND_OPTIONS[backend]
    _check_keys(options, specs, f"{where} [options] ({backend})")
    for key, value in options.items():
        spec = specs[key]
        _typed(value, spec.kind, f"options.{key}", where)
        if spec.choices:
            _check_choice(value, spec.choices, f"options.{key}", where)
        _check_range(value, f"options.{key}", where, spec.lo, spec.hi)


def parse_target(table: dict, name: str, where: str) -> Target:
    table = dict(table)
    tol = _parse_tolerance(_subtable(table, "tolerance", where), where + " [tolerance]")
    conv = _parse_conventions(_subtable(table, "quant", where), where + " [quant]")
    _check_keys(table, _TYPES[Target], where)  # typos first, so a misspelt required key gets a suggestion
    for key in ("backend", "flavour"):
        if key not in table:
            raise ConfigError(f"{where}: missing required key {key!r}")
    target = _build(Target, table, where, name=name, path=where, tolerance=tol, quant=conv)
    if target.backend not in BACKENDS:
        raise ConfigError(f"{where}: unknown backend {target.backend!r}{suggest(target.backend, BACKENDS)}",
                          f"choose one of: {', '.join(BACKENDS)}")
    flavours = FLAVOURS_BY_BACKEND[target.backend]
    if target.flavour not in flavours:
        raise ConfigError(f"{where}: flavour {target.flavour!r} is not supported by backend "
                          f"{target.backend!r}{suggest(target.flavour, flavours)}", f"choose one of: {', '.join(flavours)}")
    _check_range(target.opset, "opset", where, 13 if target.flavour != "qonnx" else 11, 23)
    _check_bits(target, where)
    _check_options(target.options, target.backend, where)
    return target


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


def _check_bench(bench: BenchSettings, where: str) -> None:
    for key in ("threads", "warmup", "warmup_s", "min_time_s"):
        _check_range(getattr(bench, key), key, where, 0)
    _check_range(bench.iterations, "iterations", where, 1)
    if not bench.batch_sizes or any(b < 1 for b in bench.batch_sizes):
        raise ConfigError(f"{where}: batch_sizes must be a non-empty list of positive integers")


def _check_budgets(budgets: Budgets, where: str) -> None:
    _check_choice(budgets.latency_percentile, PERCENTILES, "latency_percentile", where)
    for key in ("latency_ms", "size_mb", "peak_rss_mb"):
        _check_range(getattr(budgets, key), key, where, 0, lo_open=True)
    _check_range(budgets.min_accuracy, "min_accuracy", where, 0, 1)


def _profile_target(entry: str, base: Path, where: str) -> str:
    """A profile's target entry -> canonical target name, or an absolute .toml path."""
    if _is_path(entry):
        path = (base / entry).resolve()
        if not path.is_file():
            raise MissingFileError(f"{where}: target file not found: {entry}")
        return str(path)
    index = _target_index()
    if entry in index:
        return index[entry]
    raise ConfigError(f"{where}: targets lists unknown target {entry!r}{suggest(entry, list(index))}",
                      f"choose from: {', '.join(target_names())}")


def parse_profile(table: dict, name: str, where: str) -> Profile:
    table = dict(table)
    bench = _build(BenchSettings, _subtable(table, "bench", where), where + " [bench]")
    budgets = _build(Budgets, _subtable(table, "budgets", where), where + " [budgets]")
    _check_keys(table, _TYPES[Profile], where)
    if "targets" not in table:
        raise ConfigError(f"{where}: missing required key 'targets'", "list the targets this device runs, preferred first")
    profile = _build(Profile, table, where, name=name, path=where, bench=bench, budgets=budgets)
    _check_hardware(profile.hardware, where)
    _check_bench(bench, where + " [bench]")
    _check_budgets(budgets, where + " [budgets]")
    if not profile.targets:
        raise ConfigError(f"{where}: targets must name at least one target")
    base = Path(where).parent
    targets = tuple(_profile_target(t, base, where) for t in profile.targets)
    return dataclasses.replace(profile, targets=targets)


# --- name resolution -------------------------------------------------------------------------------


def _is_path(name: str) -> bool:
    return name.endswith(".toml") or "/" in name or "\\" in name


def _entries(kind: str) -> dict[str, Path]:
    return {p.stem: p for p in sorted(data_dir(kind).glob("*.toml"))}


def _index(kind: str) -> dict[str, str]:
    """name-or-alias -> canonical name for one catalog folder (cached until a file changes)."""
    files = tuple((str(p), p.stat().st_mtime_ns) for p in sorted(data_dir(kind).glob("*.toml")))
    return _build_index(kind, files)


@lru_cache(maxsize=16)
def _build_index(kind: str, files: tuple) -> dict[str, str]:
    paths = [Path(f) for f, _ in files]
    index = {p.stem: p.stem for p in paths}
    for path in paths:
        aliases = _read_toml(path).get("aliases", [])
        for alias in aliases if isinstance(aliases, list) else []:
            if alias in index and index[alias] != path.stem:
                raise ConfigError(f"{path}: alias {alias!r} is already used by {kind[:-1]} {index[alias]!r}",
                                  "aliases must be unique across the catalog")
            index[alias] = path.stem
    return index


def _target_index() -> dict[str, str]:
    return _index("targets")


def _profile_index() -> dict[str, str]:
    return _index("profiles")


def resolve_target(name_or_path: str) -> tuple[str, Path, str]:
    """-> (target name, its file, how it was found: 'name' | 'alias' | 'profile:NAME' | 'path')."""
    if _is_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise MissingFileError(f"target file not found: {path}", "pass a catalog name or an existing .toml path")
        return path.stem, path, "path"
    targets, profiles = _target_index(), _profile_index()
    if name_or_path in targets:
        name = targets[name_or_path]
        return name, _entries("targets")[name], "name" if name == name_or_path else "alias"
    if name_or_path in profiles:
        profile = load_profile(profiles[name_or_path])
        name, path, _ = resolve_target(profile.targets[0])
        return name, path, f"profile:{profile.name}"
    raise UnknownNameError(
        f"unknown target {name_or_path!r}{suggest(name_or_path, list(targets) + list(profiles))}",
        f"choose one of: {', '.join(target_names())} (or a profile name, or a path to a .toml file)")


def resolve_profile(name_or_path: str) -> tuple[str, Path]:
    if _is_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise MissingFileError(f"profile file not found: {path}", "pass a catalog name or an existing .toml path")
        return path.stem, path
    profiles = _profile_index()
    if name_or_path in profiles:
        name = profiles[name_or_path]
        return name, _entries("profiles")[name]
    raise UnknownNameError(f"unknown profile {name_or_path!r}{suggest(name_or_path, list(profiles))}",
                           f"choose one of: {', '.join(profile_names())} (or a path to a .toml file)")


def load_target(name_or_path: str) -> Target:
    name, path, _ = resolve_target(name_or_path)
    return parse_target(_read_toml(path), name, str(path))


def load_profile(name_or_path: str) -> Profile:
    name, path = resolve_profile(name_or_path)
    return parse_profile(_read_toml(path), name, str(path))


def target_names() -> list[str]:
    return list(_entries("targets"))


def profile_names() -> list[str]:
    return list(_entries("profiles"))


def as_dict(obj) -> dict:
    """A JSON-ready view of a Target or Profile (tuples become lists)."""
    return _jsonable(dataclasses.asdict(obj))


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --- summaries for listings --------------------------------------------------------------------------


def bits_text(bits) -> str:
    """(2, 3, 4, 5, 6, 7, 8) -> '2-8'; (2, 4, 8) -> '2,4,8'."""
    bits = sorted(bits)
    if len(bits) > 2 and bits == list(range(bits[0], bits[-1] + 1)):
        return f"{bits[0]}-{bits[-1]}"
    return ",".join(map(str, bits))


def target_summary(t: Target) -> dict:
    return {"name": t.name, "aliases": list(t.aliases), "backend": t.backend, "flavour": t.flavour,
            "weight_bits": bits_text(t.weight_bits), "act_bits": bits_text(t.act_bits),
            "accelerated": f"W{bits_text(t.accelerated('weight'))} A{bits_text(t.accelerated('act'))}",
            "min_top1_agreement": t.tolerance.min_top1_agreement, "description": t.description}


def profile_summary(p: Profile) -> dict:
    hw = p.hardware
    cpu = hw.get("cpu", {})
    model = str(cpu.get("model", "?")).removeprefix("Arm ")
    cpu_text = f"{cpu.get('cores', '?')}x {model}" if cpu else hw.get("arch", "")
    return {"name": p.name, "aliases": list(p.aliases), "arch": hw.get("arch", ""), "cpu": cpu_text,
            "memory_gb": hw.get("memory_gb", ""),
            "accelerator": _accelerator_text(hw.get("accelerator", {}), hw.get("fpga", {})),
            "targets": list(p.targets), "description": p.description}


def _accelerator_text(acc: dict, fpga: dict) -> str:
    if fpga:
        return f"FPGA {fpga.get('lut', 0) // 1000}K LUT, {fpga.get('dsp', '?')} DSP"
    if not acc or acc.get("kind", "none") == "none":
        return "none"
    text = f"{acc['kind'].upper()}" + (f" {acc['cuda_cores']} cores" if "cuda_cores" in acc else "")
    text += f" + {acc['dla_cores']} DLA" if acc.get("dla_cores") else ""
    tops = acc.get("int8_tops_sparse") or acc.get("int8_tops_dense")
    return text + (f", {tops} INT8 TOPS" if tops else "")


def list_targets() -> list[Target]:
    return [load_target(n) for n in target_names()]


def list_profiles() -> list[Profile]:
    return [load_profile(n) for n in profile_names()]


# --- pre-flight: what a target will not accept or not accelerate ----------------------------------


def _finding(level: str, code: str, message: str, suggestion: str = "") -> dict:
    return {"level": level, "code": code, "message": message, "suggestion": suggestion}


def _targets_accepting(weight_bits: int, act_bits: int, accelerated: bool) -> list[str]:
    names = []
    for t in list_targets():
        w = t.accelerated("weight") if accelerated else t.weight_bits
        a = t.accelerated("act") if accelerated else t.act_bits
        if weight_bits in w and act_bits in a:
            names.append(t.name)
    return names


def _bits_findings(t: Target, kind: str, bits: int, other: int) -> list[dict]:
    label, option = ("weights", "--weight-bits") if kind == "weight" else ("activations", "--act-bits")
    accepted, fast = getattr(t, f"{kind}_bits"), t.accelerated(kind)
    pair = (bits, other) if kind == "weight" else (other, bits)
    if bits not in accepted:
        alt = _targets_accepting(*pair, accelerated=True) or _targets_accepting(*pair, accelerated=False)
        nearest = min((b for b in accepted if b >= bits), default=max(accepted))
        return [_finding("error", f"{kind}_bits_not_accepted",
                         f"{t.name} does not accept {bits}-bit {label} (it accepts {bits_text(accepted)})",
                         f"use {option} {nearest}" + (f", or target {' / '.join(alt)}" if alt else ""))]
    if bits not in fast:
        runs_at = min((b for b in fast if b >= bits), default=max(fast))
        alt = _targets_accepting(*pair, accelerated=True)
        why = ("they are stored on the int8 grid, so the model is no smaller and no faster than at 8 bits"
               if kind == "weight" else
               f"they cost accuracy and give no speed-up over {runs_at}-bit activations")
        return [_finding("warning", f"{kind}_bits_not_accelerated",
                         f"{t.name} accepts {bits}-bit {label} but computes them with {runs_at}-bit kernels: {why}",
                         f"use {option} {runs_at} for this target"
                         + (f", or target {' / '.join(alt)} to gain from {bits} bits" if alt else ""))]
    return []


def _convention_findings(t: Target, weight_bits: int, act_bits: int) -> list[dict]:
    q, out = t.quant, []
    if q.act_after_relu == "signed":
        out.append(_finding("info", "signed_act_after_relu",
                            f"{t.name} quantizes activations after ReLU as signed with zero point 0: the negative "
                            f"half of the range is unused, so post-ReLU activations keep {act_bits - 1} effective bits",
                            f"distill with --target {t.name} so QAT trains with this quantizer"))
    if q.scale_type == "po2":
        out.append(_finding("info", "po2_scales", f"{t.name} needs power-of-two scales; expect slightly lower "
                            "accuracy than float scales", f"distill with --target {t.name} so QAT learns po2 scales"))
    if q.weight_scaling == "per_tensor":
        out.append(_finding("info", "per_tensor_weights", f"{t.name} uses one weight scale per tensor, which costs "
                            "accuracy at low bit widths compared with per-channel scales", ""))
    if q.bias == "float":
        out.append(_finding("info", "float_bias", f"{t.name} keeps biases in float (not quantized to int32)", ""))
    if q.first_last_bits and q.first_last_bits > min(weight_bits, act_bits):
        out.append(_finding("info", "first_last_bits", f"first and last layers stay at {q.first_last_bits} bits "
                            f"on {t.name}; the W{weight_bits}A{act_bits} setting applies to the layers between", ""))
    return out


def preflight(target: Target | str, weight_bits: int, act_bits: int) -> list[dict]:
    """Before training: what `target` will not accept or not accelerate at these bit widths.

    Returns findings {level: error|warning|info, code, message, suggestion}, errors first.
    Based on the target's declared bits and conventions only (no model is inspected).
    """
    t = load_target(target) if isinstance(target, str) else target
    findings = []
    for kind, bits in (("weight", weight_bits), ("act", act_bits)):
        if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
            findings.append(_finding("error", f"{kind}_bits_out_of_range",
                                     f"{kind} bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}",
                                     f"edgekd trains {MIN_BITS}- to {MAX_BITS}-bit students"))
    if not findings:
        findings += _bits_findings(t, "weight", weight_bits, act_bits)
        findings += _bits_findings(t, "act", act_bits, weight_bits)
        findings += _convention_findings(t, weight_bits, act_bits)
    return sorted(findings, key=lambda f: LEVELS.index(f["level"]))


def require_deployable(target: Target | str, weight_bits: int, act_bits: int) -> list[dict]:
    """preflight, raising one IncompatibleError that lists every error; returns the other findings."""
    findings = preflight(target, weight_bits, act_bits)
    errors = [f for f in findings if f["level"] == "error"]
    if errors:
        name = target if isinstance(target, str) else target.name
        raise IncompatibleError(f"W{weight_bits}A{act_bits} cannot be deployed to {name}: "
                                + "; ".join(f["message"] for f in errors),
                                "; ".join(f["suggestion"] for f in errors if f["suggestion"]) or None)
    return findings
