"""The ONNX Runtime backend: optimize, inspect and run an ONNX artifact, on the host and the device.

Needs only numpy and onnxruntime (never torch); onnxruntime itself is imported when a session is
made, so that the catalog can read this backend's options without it. ``fusion_report`` also
needs the ``onnx`` package, imported lazily; on a device without it the report says so.
"""

from __future__ import annotations

import importlib
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.errors import EdgekdError, MissingFileError
from ..core.fsutil import atomic_path
from . import Backend, Compiled, ExportContext, Option, host_facts

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)

# ONNX Runtime's graph optimization levels, by the names targets use.
LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}


def _ort():
    return importlib.import_module("onnxruntime")

# Compute nodes that run in floating point vs. in integer arithmetic after ORT's rewrites.
# Fused* are ORT's float fusions (Conv+activation, MatMul+scale); com.microsoft.nchwc Conv is "Conv".
FLOAT_COMPUTE = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"})
QUANT_COMPUTE = frozenset({"QLinearConv", "QLinearConvTranspose", "QLinearMatMul", "QGemm", "ConvInteger",
                           "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})


def select_providers(requested: Sequence[str] | None = None) -> list[str]:
    """The execution providers to use: CPU by default, else those requested that this build offers.

    Raises EdgekdError when none of the requested providers is available.
    """
    available = _ort().get_available_providers()
    if not requested:
        return list(DEFAULT_PROVIDERS)
    chosen = [p for p in requested if p in available]
    if not chosen:
        raise EdgekdError(f"none of the execution providers {list(requested)} is available in this "
                          f"onnxruntime build", f"available: {', '.join(available)}")
    return chosen


def _options(threads: int, level: str):
    ort = _ort()
    if level not in LEVELS:
        raise EdgekdError(f"unknown optimization level {level!r}", f"choose one of: {', '.join(LEVELS)}")
    if threads < 0:
        raise EdgekdError(f"threads must be >= 0, got {threads}", "0 lets ONNX Runtime choose")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    so.log_severity_level = 3  # errors only: keep warnings out of the benchmark's terminal output
    return so


# Session config entries a bundle asks for are stored in the model's metadata under this key
# (a JSON object), so that every session that loads the file (export's parity check, bench on the
# device) applies them without extra settings. See ``with_session_config``.
SESSION_CONFIG_KEY = "edgekd.session_config"
# ORT session config keys (onnxruntime_session_options_config_keys.h):
# - x64quantprecision "1": on x86-64 with AVX2/AVX-512 but no VNNI, use U8U8 int8 GEMM kernels
#   instead of U8S8 ones whose int16 pair sums (vpmaddubsw) saturate; "only effective with AVX2 or
#   AVX512 platforms", a no-op on ARM. The result is exact int32 accumulation, which is what ARM's
#   dot-product kernels compute, so an x86 host can validate an ARM bundle's 8-bit weights exactly.
#   It does NOT emulate ARM's kernels, their speed or their threading: ORT has no such mode.
# - qdqisint8allowed: "only when exporting an ORT format model for use on a different platform";
#   "1" for ARM targets (S8 Q/DQ groups may be fused there), "0" for others.
# - minimal_build_optimizations "save": keep the Q/DQ fusions as runtime optimizations in an ORT
#   format file, so that a minimal ORT build on the device can still apply them.
X64_EXACT_INT8 = {"session.x64quantprecision": "1"}


def session_config(model_path) -> dict:
    """The session config entries stored in ``model_path`` (``{}`` when none)."""
    import json

    import sys

    path = Path(model_path)
    meta = None
    if path.suffix != ".ort" and "onnx" in sys.modules:  # export: onnx is loaded anyway
        onnx = sys.modules["onnx"]
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if meta is None:  # bench (onnx is never imported there) and .ort files: one unoptimized ORT load
        peek = _ort().InferenceSession(str(path), sess_options=_options(1, "disabled"), providers=["CPUExecutionProvider"])
        meta = dict(peek.get_modelmeta().custom_metadata_map)
    raw = meta.get(SESSION_CONFIG_KEY)
    return json.loads(raw) if raw else {}


def with_session_config(model_path, entries: dict) -> Path:
    """Store session config ``entries`` in the metadata of the ONNX file ``model_path`` (in place)."""
    import json

    import onnx

    model = onnx.load(str(model_path))
    kept = [p for p in model.metadata_props if p.key != SESSION_CONFIG_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if entries:
        onnx.helper.set_model_props(model, {**{p.key: p.value for p in kept},
                                            SESSION_CONFIG_KEY: json.dumps(entries, sort_keys=True)})
    with atomic_path(Path(model_path)) as tmp:
        onnx.save(model, str(tmp))
    return Path(model_path)


# the session config entries edgekd stores in a model (see above); a model asking for others (thread
# pools, affinities, allocators...) was not written by edgekd export and is refused
STORED_CONFIG_KEYS = ("session.x64quantprecision", "session.qdqisint8allowed",
                      "optimization.minimal_build_optimizations")


def _check_stored_config(model_path: Path, config) -> None:
    bad = [str(k) for k in config if k not in STORED_CONFIG_KEYS] if isinstance(config, dict) else [repr(config)]
    if bad:
        raise EdgekdError(f"{model_path} asks ONNX Runtime for session settings edgekd never stores: "
                          f"{', '.join(bad)[:200]}", "re-export the bundle with `edgekd export`")


def _session(model_path: Path, so, providers: Sequence[str] | None, config: dict | None = None):
    model_path = Path(model_path)
    if not model_path.is_file():
        raise MissingFileError(f"model file not found: {model_path}")
    if config is None:
        try:
            config = session_config(model_path)
        except Exception:  # unreadable file: the session below reports it as the user error it is
            config = {}
        _check_stored_config(model_path, config)
    for key, value in config.items():
        so.add_session_config_entry(key, str(value))
    chosen = select_providers(providers)
    try:
        session = _ort().InferenceSession(str(model_path), sess_options=so, providers=chosen)
        session._edgekd_config = dict(config)
        return session
    except Exception as e:  # ORT raises its own pybind types (InvalidProtobuf, Fail, InvalidGraph...)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgekdError(f"ONNX Runtime cannot load {model_path}: {detail}",
                          "re-export the bundle with `edgekd export`") from None


def make_session(model_path, threads: int = 0, providers: Sequence[str] | None = None, level: str = "all"):
    """An InferenceSession with ``threads`` intra-op threads (0: ORT's default, one per physical
    core), full graph optimization (``level``) and the providers chosen by ``select_providers``."""
    return _session(Path(model_path), _options(threads, level), providers)


def optimize(model_path, out_path, level: str = "basic", providers: Sequence[str] | None = None,
             config: dict | None = None) -> Path:
    """Save ORT's optimized graph of ``model_path`` to ``out_path`` (``.ort`` suffix: ORT format).

    Levels (ONNX Runtime's graph optimization levels):
    - ``basic``: semantics-preserving rewrites (constant folding, redundant node elimination,
      Conv+BatchNorm/Add folding) that run before the graph is split between execution providers
      and use only standard ONNX ops, so the file is portable: optimize on the host, ship to a Pi.
    - ``extended``: fusions applied after partitioning to nodes assigned to the CPU/CUDA providers
      (e.g. Q/DQ pairs into ``QLinearConv``, GELU, attention); may emit ``com.microsoft`` contrib
      ops, so it needs an ORT build with those kernels (every standard build has them).
    - ``all``: adds layout rewrites (NCHWc blocking) tuned to this CPU's vector width; the file is
      specific to this machine's hardware and should not be copied to a different device.
    The session that bench creates applies ``all`` itself at load time, on the device.
    ``config``: extra session config entries for the saving session (e.g. ORT format keys).
    """
    so = _options(0, level)
    out_path = Path(out_path)
    so.add_session_config_entry("session.save_model_format", "ORT" if out_path.suffix == ".ort" else "ONNX")
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, str(value))
    with atomic_path(out_path) as tmp:
        so.optimized_model_filepath = str(tmp)
        _session(Path(model_path), so, providers, config={})
    return out_path


def to_ort_format(model_path, out_path, platform: str = "arm64", level: str = "basic") -> Path:
    """Convert ``model_path`` to an ORT format file (``.ort``, flatbuffer; loads faster and is what
    minimal/mobile ORT builds read), as onnxruntime.tools.convert_onnx_models_to_ort does with
    ``--optimization_style Runtime``: ``level`` optimizations applied now, the Q/DQ fusions kept as
    runtime optimizations for the device, ``qdqisint8allowed`` set for ``platform``."""
    if platform not in ("arm64", "x86_64"):
        raise EdgekdError(f"unknown ORT format platform {platform!r}", "choose arm64 or x86_64")
    config = {"optimization.minimal_build_optimizations": "save",
              "session.qdqisint8allowed": "1" if platform == "arm64" else "0"}
    return optimize(model_path, out_path, level=level, config=config)


def fusion_report(model_path, level: str = "all") -> dict:
    """Count the compute nodes left after ORT optimizes ``model_path`` at ``level``.

    ``float_compute`` counts float Conv/Gemm/MatMul (and ORT's Fused* variants);
    ``quantized_compute`` counts integer kernels (QLinearConv, QLinearMatMul, QGemm, ConvInteger,
    MatMulInteger...). An int8 export that truly runs in int8 has ``float_compute`` == 0;
    ``quantized_fraction`` = quantized / (quantized + float), None when there are no compute nodes.
    Without the ``onnx`` package: ``{"available": False, "reason": ...}`` instead of the counts.
    """
    try:
        import onnx
    except ImportError:
        return {"available": False, "reason": "the 'onnx' package is not installed, so the optimized graph "
                                               "cannot be read; run fusion_report on the host"}
    with tempfile.TemporaryDirectory(prefix="edgekd-fusion-") as tmp:
        optimized = optimize(model_path, Path(tmp) / "optimized.onnx", level=level)
        ops = Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    return _summarize_ops(ops, level)


def _summarize_ops(ops: Counter, level: str) -> dict:
    float_ops = {op: n for op, n in sorted(ops.items()) if op in FLOAT_COMPUTE}
    quant_ops = {op: n for op, n in sorted(ops.items()) if op in QUANT_COMPUTE}
    n_float, n_quant = sum(float_ops.values()), sum(quant_ops.values())
    return {
        "available": True,
        "level": level,
        "float_compute": n_float,
        "quantized_compute": n_quant,
        "quantized_fraction": n_quant / (n_float + n_quant) if n_float + n_quant else None,
        "float_ops": float_ops,
        "quantized_ops": quant_ops,
        "ops": dict(sorted(ops.items())),
    }


def input_info(session) -> dict:
    """Name and shape of the first input; ``fixed_batch`` is the batch dimension when it is a
    fixed integer in the graph, None when it is symbolic (any batch size runs)."""
    first = session.get_inputs()[0]
    shape = list(first.shape)
    fixed = shape[0] if shape and isinstance(shape[0], int) else None
    return {"name": first.name, "names": [i.name for i in session.get_inputs()], "shape": shape,
            "type": first.type, "fixed_batch": fixed}


def run(session, x: np.ndarray) -> np.ndarray:
    """The first output of ``session`` for the input batch ``x`` (fed to the first input)."""
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x)})[0]


def timed_call(session, x: np.ndarray):
    """A zero-argument callable doing one ``session.run`` on ``x``; the feed is built once so the
    timing loop measures the run, not dictionary or array preparation."""
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(x)}
    run_ = session.run
    return lambda: run_(None, feed)


def describe_environment(session=None) -> dict:
    """Host facts plus the runtime: ORT version, providers available and (with a session) used,
    and ``intra_op_threads`` as configured (0 = ORT's default, one thread per physical core)."""
    ort = _ort()
    env = host_facts()
    env.update({"runtime": "onnxruntime", "onnxruntime_version": ort.__version__,
                "providers_available": ort.get_available_providers()})
    if session is not None:
        env["providers_used"] = session.get_providers()
        env["intra_op_threads"] = session.get_session_options().intra_op_num_threads
        env["session_config"] = getattr(session, "_edgekd_config", {})
        if getattr(session, "_edgekd_fallback", None):
            env["fallback"] = session._edgekd_fallback
    return env


def providers_for(options: dict | None) -> tuple[list[str], str | None]:
    """The providers for a target's ``execution_provider`` option: it (then the CPU) when this
    build offers it; otherwise the CPU, and a sentence saying so (bench puts it in the row)."""
    requested = (options or {}).get("execution_provider")
    if not requested or requested == "CPUExecutionProvider":
        return list(DEFAULT_PROVIDERS), None
    available = _ort().get_available_providers()
    if requested in available:
        return [requested, "CPUExecutionProvider"], None
    return list(DEFAULT_PROVIDERS), (f"execution provider {requested} is not available in this onnxruntime build "
                                     f"(available: {', '.join(available)}); ran on CPUExecutionProvider")


class OrtRunner:
    """The ``Runner`` (see edgekd.backends) for ONNX Runtime."""

    name = "onnxruntime"

    def __init__(self, level: str = "all"):
        self.level = level

    def load(self, model_path: Path, threads: int = 0, options: dict | None = None) -> Any:
        providers, fallback = providers_for(options)
        session = make_session(model_path, threads=threads, providers=providers, level=self.level)
        session._edgekd_fallback = fallback
        return session

    def run(self, handle: Any, x: np.ndarray) -> np.ndarray:
        return run(handle, x)

    def timed_call(self, handle: Any, x: np.ndarray):
        return timed_call(handle, x)

    def input_info(self, handle: Any) -> dict:
        return input_info(handle)

    def describe_environment(self, handle: Any = None) -> dict:
        return describe_environment(handle)


RUNNER = OrtRunner()


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU (or another execution provider the build offers). Export saves ORT's
    optimized graph (``model.opt.onnx``) at the target's level with the session config it asks for
    stored in the file, and, with ``ort_format``, the ORT format file for minimal builds; the
    manifest gets the fusion report (float Conv/Gemm left after optimization)."""

    name = "onnxruntime"
    title = "ONNX Runtime"
    float_ok = True
    flavours = ("qdq", "qcdq")
    package, extra, purpose = "onnxruntime", "device", "running an ONNX Runtime bundle"
    options = {
        "graph_optimization_level": Option(
            str, "level of the optimized model export saves in the bundle; the device session applies 'all' "
            "at load time (Q/DQ -> QLinearConv fusion happens at 'extended' or above)", tuple(LEVELS)),
        "execution_provider": Option(str, "ONNX Runtime execution provider to run with when the installed build "
                                     "offers it (default CPUExecutionProvider); otherwise the CPU, said in the row"),
        "x64_exact_int8": Option(bool, "store session.x64quantprecision=1 in the model: exact int8 accumulation "
                                 "(U8U8 kernels) on x86 CPUs without VNNI, as ARM's dot-product kernels compute; "
                                 "no effect on ARM"),
        "ort_format": Option(bool, "also convert to ORT format (model.ort, what minimal/mobile ORT builds load); "
                             "the bundle then runs model.ort"),
        "ort_platform": Option(str, "platform the ORT format file is for (sets session.qdqisint8allowed)",
                               ("arm64", "x86_64")),
    }

    def runner(self) -> OrtRunner:
        _ort()
        return RUNNER

    def compile(self, onnx_path: Path, ctx: ExportContext) -> Compiled:
        opts, bundle = ctx.target.options, onnx_path.parent
        level = opts.get("graph_optimization_level", "basic")
        artifact = optimize(onnx_path, bundle / "model.opt.onnx", level=level)
        if opts.get("x64_exact_int8"):
            with_session_config(artifact, X64_EXACT_INT8)
            ctx.log("session config stored in the model: session.x64quantprecision=1 (exact int8 accumulation on "
                    "x86 CPUs without VNNI, as ARM's dot-product kernels compute; no effect on ARM)")
        fusion = fusion_report(artifact)
        if opts.get("ort_format"):
            platform = opts.get("ort_platform", "arm64")
            artifact = to_ort_format(artifact, bundle / "model.ort", platform=platform, level=level)
            ctx.log(f"converted to ORT format for {platform}: {artifact.name}")
        return Compiled(Path(artifact), {"fusion": fusion})

    def manifest_extras(self, ctx: ExportContext) -> dict:
        return {"session_config": session_config(ctx.bundle / "model.opt.onnx")}

    def run_tapped(self, model_path: Path, model, tapped: dict, x: np.ndarray) -> dict[str, np.ndarray]:
        from .taps import onnxruntime_tapped

        return onnxruntime_tapped(model, tapped, x)


BACKEND = OnnxRuntimeBackend()
