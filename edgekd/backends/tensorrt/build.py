"""Building an engine on the device (needs TensorRT)."""

from __future__ import annotations

import threading
from pathlib import Path


from ...core.errors import EdgekdError
from .plan import (ENGINE_FILE, LAYERS_FILE, BuildPlan, build_plan, dla_summary, import_cudart, import_tensorrt,
                   layer_precisions, timing_cache_name)


# --- building (needs TensorRT, on the device) ----------------------------------------------------

_LOGGER = None
_LOGGER_LOCK = threading.Lock()


def _logger(trt):
    """The process's one ``trt.Logger``. The logger given to the first Builder/Runtime is the one
    TensorRT keeps ("The logger used to create an instance of IBuilder, IRuntime or IRefitter is
    used for all objects created through that interface", pyCoreDoc.h ILoggerDoc); a second
    logger object only draws TensorRT's "logger differs" warning. Module-level, created lazily."""
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:
            _LOGGER = trt.Logger(trt.Logger.WARNING)
        return _LOGGER


def _parse(trt, builder, plan: BuildPlan, onnx_path: Path, logger):
    network = builder.create_network(plan.creation_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EdgekdError(f"TensorRT's ONNX parser rejected {onnx_path}: {'; '.join(errors[:3])}",
                          "check that the bundle was exported for a TensorRT target (flavour qdq, signed int8 "
                          "activations, float bias)")
    return network, parser


def _config(trt, builder, network, plan: BuildPlan, options: dict):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.get("workspace_mb", 1024)) << 20)
    if hasattr(config, "builder_optimization_level"):  # TensorRT >= 8.6
        config.builder_optimization_level = int(options.get("builder_optimization_level", 3))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # for the engine inspector
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if plan.dla_core >= 0:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
    profile = None
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shape = tuple(inp.shape)
        if any(d < 0 for d in shape[1:]):
            raise EdgekdError(f"input {inp.name!r} has dynamic dimensions besides the batch: {shape}",
                              "export the model with a fixed input shape (only the batch may vary)")
        if shape and shape[0] < 0:
            lo, opt, hi = plan.batch_profile
            profile = profile or builder.create_optimization_profile()
            rest = shape[1:]
            profile.set_shape(inp.name, (lo,) + rest, (opt,) + rest, (hi,) + rest)
    if profile is not None:
        config.add_optimization_profile(profile)
    return config


def dla_placement(trt, network, config) -> list[dict]:
    """Per network layer: name, type and "DLA" or "GPU", by ``IBuilderConfig.can_run_on_DLA``
    with the config's default device set to the DLA (what GPU fallback will move to the GPU)."""
    rows = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        rows.append({"name": layer.name, "type": str(layer.type).rsplit(".", 1)[-1],
                     "device": "DLA" if config.can_run_on_DLA(layer) else "GPU"})
    return rows


def _device_name() -> str:
    cudart = import_cudart()
    err, props = cudart.cudaGetDeviceProperties(0)
    _check(cudart, err, "cudaGetDeviceProperties")
    name = props.name
    return name.decode(errors="replace").strip("\x00") if isinstance(name, bytes) else str(name)


def build_engine(onnx_path: Path, out_dir: Path, options: dict, dla_cores: int | None = None,
                 batch_sizes: tuple[int, ...] = (1, 64), log=lambda s: None, opt_batch: int | None = None) -> dict:
    """Build ``out_dir/model.engine`` from ``onnx_path``; save the engine inspector's layer
    information (``engine_layers.json``) and the timing cache (next to the engine, named by
    ``timing_cache_name``). ``batch_sizes``: those bench will run (the optimization profile spans
    them; a DLA engine takes ``opt_batch`` only, see ``batch_profile``). Returns what the manifest
    records about the build; with a DLA core, ``dla`` says where the layers run (``dla_summary``)
    and ``precision`` drops ``+dla`` when every layer fell back to the GPU."""
    trt = import_tensorrt()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    dla_cores = builder.num_DLA_cores if dla_cores is None else dla_cores
    plan = build_plan(trt.__version__, options, dla_cores, batch_sizes, opt_batch)
    for note in plan.notes:
        log(f"note: {note}")
    network, _parser = _parse(trt, builder, plan, Path(onnx_path), logger)
    config = _config(trt, builder, network, plan, options)
    placement = dla_placement(trt, network, config) if plan.dla_core >= 0 else []
    if plan.dla_core >= 0 and not plan.gpu_fallback:
        refused = [p["name"] for p in placement if p["device"] != "DLA"]
        if refused:
            raise EdgekdError(f"{len(refused)} of {len(placement)} layers cannot run on DLA core {plan.dla_core} and "
                              f"gpu_fallback is off: {', '.join(refused[:5])}",
                              "set gpu_fallback = true, or dla_core = -1 to build for the GPU")
    device = _device_name()
    cache_file = _timing_cache(config, Path(out_dir), device, trt.__version__, plan, options)
    log(f"building a TensorRT {trt.__version__} engine on {device} ({plan.precision}, "
        f"{'strongly' if plan.strongly_typed else 'weakly'} typed, batch {plan.batch_profile[0]}.."
        f"{plan.batch_profile[2]}, opt {plan.batch_profile[1]})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgekdError("TensorRT could not build an engine from the bundle (see its log above)",
                          "try a larger workspace_mb, or dla_core = -1")
    (Path(out_dir) / ENGINE_FILE).write_bytes(bytes(serialized))
    if cache_file is not None:
        cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    info = _inspect(trt, logger, serialized, plan, Path(out_dir))
    result = {"trt_version": trt.__version__, "device": device, "plan": _plan_record(plan),
              "precision": plan.precision, "batch_profile": list(plan.batch_profile),
              "timing_cache": cache_file.name if cache_file else None, "engine_file": ENGINE_FILE,
              "layers_file": LAYERS_FILE, "layers": layer_precisions(info)}
    if plan.dla_core >= 0:
        result["dla"] = dla_summary(plan, placement, info)
        result["dla"]["placement"] = placement
        result["precision"] = result["dla"]["precision"]
        log(f"DLA core {plan.dla_core}: {result['dla']['note']}")
    return result


def _timing_cache(config, out_dir: Path, device: str, version: str, plan: BuildPlan, options: dict) -> Path | None:
    """The timing cache file for this GPU, version and precision, loaded into ``config`` (None: disabled)."""
    base = options.get("timing_cache", "timing.cache")
    if not base:
        return None
    cache_file = out_dir / timing_cache_name(device, version, plan.precision, base)
    blob = cache_file.read_bytes() if cache_file.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(blob), False)  # ignore_mismatch=False
    return cache_file


def _inspect(trt, logger, serialized, plan: BuildPlan, out_dir: Path) -> str:
    """Load the engine back and save the engine inspector's layer information (JSON); returns it."""
    runtime = trt.Runtime(logger)
    if plan.dla_core >= 0:
        runtime.DLA_core = plan.dla_core
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise EdgekdError(f"TensorRT built {out_dir / ENGINE_FILE} but cannot load it back", "see TensorRT's log above")
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    (out_dir / LAYERS_FILE).write_text(info)
    del engine, runtime
    return info


def _plan_record(plan: BuildPlan) -> dict:
    record = dict(plan.__dict__)
    record["batch_profile"] = list(plan.batch_profile) if plan.batch_profile else None
    return record


def _check(cudart, err, what: str) -> None:
    if int(err) != 0:
        raise EdgekdError(f"CUDA call {what} failed with error {int(err)}", "is a CUDA GPU visible to this process?")


def _call(cudart, fn, *args):
    result = fn(*args)
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    _check(cudart, err, fn.__name__ if hasattr(fn, "__name__") else str(fn))
    return rest[0] if len(rest) == 1 else rest
