"""The TensorRT backend: build an int8 engine from a bundle's Q/DQ ONNX graph, on the device,
and run it.

UNVERIFIED: written against NVIDIA's documented Python API (TensorRT 10.x and the 10.x -> 11.x
migration guide) and cuda-python's runtime bindings; it has not been run on a Jetson or any GPU
yet. The pure functions (``build_plan``, ``timing_cache_name``, ``layer_precisions``) are tested
everywhere; the rest only where ``tensorrt`` imports and a CUDA GPU is present.

Engines are specific to the GPU and the TensorRT version, so they are built where they run:
``edgekd export --target jetson`` on a workstation writes the bundle (ONNX checked with ONNX
Runtime) and the command to run on the Jetson, ``edgekd compile BUNDLE``, which calls
``build_engine`` here.

Version branches (``build_plan``):
- TensorRT < 10.12 (JetPack 6.x ships 10.3; Xavier's JetPack 5.1 ships 8.5): weakly typed
  network; the Q/DQ layers are honoured with ``BuilderFlag.INT8``; ``BuilderFlag.FP16`` lets the
  layers outside Q/DQ pairs run in FP16 (target option ``fp16``).
- 10.12 <= TensorRT < 11: weak typing is deprecated: the network is created STRONGLY_TYPED; the
  Q/DQ nodes alone decide int8, no precision flags may be set, float layers keep the ONNX
  types (FP32: ``fp16`` is ignored, with a note).
- TensorRT >= 11: always strongly typed (``STRONGLY_TYPED`` is deprecated and ignored; the
  INT8/FP16 builder flags no longer exist). Same plan as above, without the flag.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgekdError, MissingExtraError
from . import host_facts

ENGINE_FILE = "model.engine"
LAYERS_FILE = "engine_layers.json"
STRONG_TYPING_FROM = (10, 12)
EXTRA_HINT = ("pip install 'edgekd[tensorrt]' (on a Jetson, TensorRT's Python bindings come with "
              "JetPack: apt install python3-libnvinfer)")


def import_tensorrt():
    """The ``tensorrt`` module, or a one-line MissingExtraError naming the install."""
    try:
        import tensorrt as trt
    except ImportError:
        error = MissingExtraError("tensorrt", "tensorrt", "building or running a TensorRT engine")
        error.hint = f"install it with: {EXTRA_HINT}"
        raise error from None
    return trt


def import_cudart():
    """cuda-python's CUDA runtime bindings (``cuda.bindings.runtime`` since cuda-python 12.6,
    ``cuda.cudart`` before); the engine runner needs them for device memory, streams and events."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            error = MissingExtraError("cuda-python", "tensorrt", "running a TensorRT engine")
            error.hint = "install it with: pip install 'edgekd[tensorrt]' (cuda-python matching the CUDA version)"
            raise error from None
    return cudart


def version_tuple(version: str) -> tuple[int, int]:
    major, minor = (re.findall(r"\d+", version) + ["0", "0"])[:2]
    return int(major), int(minor)


# --- what to build (pure: testable without TensorRT) -----------------------------------------------

@dataclass
class BuildPlan:
    trt_version: str
    strongly_typed: bool  # network created with the STRONGLY_TYPED flag (or always, on 11.x)
    network_flag: bool  # whether to pass the STRONGLY_TYPED creation flag explicitly
    builder_flags: list[str] = field(default_factory=list)  # BuilderFlag names to set
    dla_core: int = -1
    precision: str = "int8"
    notes: list[str] = field(default_factory=list)


def build_plan(trt_version: str, options: dict, dla_cores: int = 0) -> BuildPlan:
    """The network typing, builder flags and DLA use for ``trt_version`` and the target's options
    (``fp16``, ``dla_core``, ``gpu_fallback``); ``dla_cores`` is what the device has (profile
    ``hardware.accelerator.dla_cores``, or ``builder.num_DLA_cores`` on the device)."""
    version = version_tuple(trt_version)
    fp16 = bool(options.get("fp16", True))
    plan = BuildPlan(trt_version, strongly_typed=version >= STRONG_TYPING_FROM,
                     network_flag=STRONG_TYPING_FROM <= version < (11, 0))
    if not plan.strongly_typed:
        plan.builder_flags.append("INT8")  # weak typing: Q/DQ layers need the INT8 flag
        if fp16:
            plan.builder_flags.append("FP16")
        plan.precision = "int8+fp16" if fp16 else "int8"
    elif fp16:
        plan.notes.append(f"TensorRT {trt_version} builds strongly typed networks: float layers keep their ONNX "
                          "type (FP32); option fp16 is ignored")
    dla = int(options.get("dla_core", -1))
    if dla >= 0:
        if dla >= dla_cores:
            plan.notes.append(f"dla_core {dla} requested but the device has {dla_cores} DLA core(s): building for the GPU")
        else:
            plan.dla_core = dla
            plan.precision += f"+dla{dla}"
            if options.get("gpu_fallback", True):
                plan.builder_flags.append("GPU_FALLBACK")
    return plan


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def timing_cache_name(device_name: str, trt_version: str, precision: str, base: str = "timing.cache") -> str:
    """Timing cache file name keyed by GPU name, TensorRT version and precision: a cache from
    another device or version is never reused (TensorRT rejects mismatched caches anyway)."""
    stem, dot, ext = base.rpartition(".")
    stem, ext = (stem, ext) if dot else (base, "cache")
    return f"{stem}-{_slug(device_name)}-trt{_slug(trt_version)}-{_slug(precision)}.{ext}"


def layer_precisions(engine_info: dict | str) -> dict:
    """Summary of the engine inspector's JSON (``LayerInformationFormat.JSON`` at
    ``ProfilingVerbosity.DETAILED``): layers per output precision and the names of layers that
    compute in int8. TensorRT 10 names I/O under "Inputs"/"Outputs" with "Format/Datatype"; 11.x
    splits "Format" and "DataType"; both are read."""
    info = json.loads(engine_info) if isinstance(engine_info, str) else engine_info
    by_precision: dict[str, int] = {}
    int8_layers = []
    for layer in info.get("Layers", []):
        if isinstance(layer, str):  # ProfilingVerbosity below DETAILED: names only
            by_precision["unknown"] = by_precision.get("unknown", 0) + 1
            continue
        outputs = layer.get("Outputs") or [{}]
        fmt = str(outputs[0].get("Format/Datatype") or outputs[0].get("DataType") or "unknown")
        precision = next((p for p in ("Int8", "FP16", "Half", "FP32", "Float", "Int32") if p.lower() in fmt.lower()),
                         "other")
        precision = {"Half": "FP16", "Float": "FP32"}.get(precision, precision)
        by_precision[precision] = by_precision.get(precision, 0) + 1
        inputs = layer.get("Inputs") or []
        if precision == "Int8" or any("int8" in str(i.get("Format/Datatype") or i.get("DataType") or "").lower()
                                      for i in inputs):
            int8_layers.append(layer.get("Name", "?"))
    total = sum(by_precision.values())
    return {"layers": total, "by_output_precision": by_precision, "int8_layers": int8_layers,
            "int8_fraction": len(int8_layers) / total if total else None}


# --- building (needs TensorRT, on the device) ----------------------------------------------------

def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def _parse(trt, builder, plan: BuildPlan, onnx_path: Path, logger):
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.network_flag else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EdgekdError(f"TensorRT's ONNX parser rejected {onnx_path}: {'; '.join(errors[:3])}",
                          "check that the bundle was exported for a TensorRT target (flavour qdq)")
    return network, parser


def _config(trt, builder, network, plan: BuildPlan, options: dict, batch_sizes: tuple[int, ...]):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.get("workspace_mb", 1024)) << 20)
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = int(options.get("builder_optimization_level", 3))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # for the engine inspector
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if plan.dla_core >= 0:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
    inp = network.get_input(0)
    if inp.shape[0] == -1:  # dynamic batch: one optimization profile covering the bench batch sizes
        profile = builder.create_optimization_profile()
        rest = tuple(inp.shape[1:])
        lo, hi = min(batch_sizes), max(batch_sizes)
        profile.set_shape(inp.name, (lo,) + rest, (hi,) + rest, (hi,) + rest)
        config.add_optimization_profile(profile)
    return config


def _device_name() -> str:
    cudart = import_cudart()
    err, props = cudart.cudaGetDeviceProperties(0)
    _check(cudart, err, "cudaGetDeviceProperties")
    name = props.name
    return name.decode(errors="replace").strip("\x00") if isinstance(name, bytes) else str(name)


def build_engine(onnx_path: Path, out_dir: Path, options: dict, dla_cores: int | None = None,
                 batch_sizes: tuple[int, ...] = (1, 64), log=lambda s: None) -> dict:
    """Build ``out_dir/model.engine`` from ``onnx_path``; save the engine inspector's layer
    information (``engine_layers.json``) and the timing cache (next to the engine, named by
    ``timing_cache_name``). Returns what the manifest records about the build."""
    trt = import_tensorrt()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    dla_cores = builder.num_DLA_cores if dla_cores is None else dla_cores
    plan = build_plan(trt.__version__, options, dla_cores)
    for note in plan.notes:
        log(f"note: {note}")
    network, _parser = _parse(trt, builder, plan, Path(onnx_path), logger)
    config = _config(trt, builder, network, plan, options, batch_sizes)
    device = _device_name()
    cache_file = None
    if options.get("timing_cache", "timing.cache"):
        cache_file = Path(out_dir) / timing_cache_name(device, trt.__version__, plan.precision,
                                                       options.get("timing_cache", "timing.cache"))
        blob = cache_file.read_bytes() if cache_file.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(blob), False)  # ignore_mismatch=False
    log(f"building a TensorRT {trt.__version__} engine on {device} ({plan.precision}, "
        f"{'strongly' if plan.strongly_typed else 'weakly'} typed)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgekdError("TensorRT could not build an engine from the bundle (see its log above)",
                          "try a larger workspace_mb, or dla_core = -1")
    engine_path = Path(out_dir) / ENGINE_FILE
    engine_path.write_bytes(bytes(serialized))
    if cache_file is not None:
        cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    (Path(out_dir) / LAYERS_FILE).write_text(info)
    return {"trt_version": trt.__version__, "device": device, "plan": plan.__dict__,
            "timing_cache": cache_file.name if cache_file else None, "engine_file": ENGINE_FILE,
            "layers_file": LAYERS_FILE, "layers": layer_precisions(info)}


# --- running (needs TensorRT + cuda-python + a GPU) ---------------------------------------------------

def _check(cudart, err, what: str) -> None:
    if int(err) != 0:
        raise EdgekdError(f"CUDA call {what} failed with error {int(err)}", "is a CUDA GPU visible to this process?")


def _call(cudart, fn, *args):
    result = fn(*args)
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    _check(cudart, err, fn.__name__ if hasattr(fn, "__name__") else str(fn))
    return rest[0] if len(rest) == 1 else rest


class EngineHandle:
    """A deserialized engine, its execution context, a stream and device buffers grown on demand."""

    def __init__(self, engine_path: Path):
        self.trt = import_tensorrt()
        self.cudart = import_cudart()
        logger = _logger(self.trt)
        self.engine = self.trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise EdgekdError(f"TensorRT cannot load {engine_path} (built by another TensorRT version or GPU?)",
                              "rebuild it on this device with `edgekd compile BUNDLE`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.stream = _call(self.cudart, self.cudart.cudaStreamCreate)
        self.start = _call(self.cudart, self.cudart.cudaEventCreate)
        self.end = _call(self.cudart, self.cudart.cudaEventCreate)
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _call(self.cudart, self.cudart.cudaFree, ptr)
            ptr = int(_call(self.cudart, self.cudart.cudaMalloc, nbytes))
            self.buffers[name] = (ptr, nbytes)
            self.context.set_tensor_address(name, ptr)
        return ptr

    def prepare(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bind ``x`` to the input and return (host input, host output) arrays."""
        name = self.inputs[0]
        dtype = self.trt.nptype(self.engine.get_tensor_dtype(name))
        host_in = np.ascontiguousarray(x, dtype=dtype)
        self.context.set_input_shape(name, tuple(host_in.shape))
        self._buffer(name, host_in.nbytes)
        out = self.outputs[0]
        shape = tuple(self.context.get_tensor_shape(out))
        host_out = np.empty(shape, dtype=self.trt.nptype(self.engine.get_tensor_dtype(out)))
        self._buffer(out, host_out.nbytes)
        return host_in, host_out

    def infer(self, host_in: np.ndarray, host_out: np.ndarray, events: bool = False) -> None:
        """H2D copy, enqueue, D2H copy, synchronize; with ``events`` the compute is bracketed by
        CUDA events (read with ``compute_ms``)."""
        c = self.cudart
        h2d, d2h = c.cudaMemcpyKind.cudaMemcpyHostToDevice, c.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _call(c, c.cudaMemcpyAsync, self.buffers[self.inputs[0]][0], host_in.ctypes.data, host_in.nbytes, h2d, self.stream)
        if events:
            _call(c, c.cudaEventRecord, self.start, self.stream)
        if not self.context.execute_async_v3(int(self.stream)):
            raise EdgekdError("TensorRT execute_async_v3 failed")
        if events:
            _call(c, c.cudaEventRecord, self.end, self.stream)
        _call(c, c.cudaMemcpyAsync, host_out.ctypes.data, self.buffers[self.outputs[0]][0], host_out.nbytes, d2h, self.stream)
        _call(c, c.cudaStreamSynchronize, self.stream)

    def compute_ms(self) -> float:
        return float(_call(self.cudart, self.cudart.cudaEventElapsedTime, self.start, self.end))


class TensorrtRunner:
    """The ``Runner`` for TensorRT engine bundles. ``timed_call`` times what an application sees
    (H2D copy + compute + D2H copy + synchronize, pageable host memory); ``device_timing``
    reports the GPU compute alone (CUDA events around ``execute_async_v3``)."""

    name = "tensorrt"

    def load(self, model_path: Path, threads: int = 0) -> Any:
        model_path = Path(model_path)
        if model_path.suffix != ".engine":
            raise EdgekdError(f"{model_path.parent} holds no TensorRT engine yet (compiled: false)",
                              f"build it on the device: edgekd compile {model_path.parent}")
        return EngineHandle(model_path)

    def run(self, handle: EngineHandle, x: np.ndarray) -> np.ndarray:
        host_in, host_out = handle.prepare(x)
        handle.infer(host_in, host_out)
        return host_out.astype(np.float32, copy=False)

    def timed_call(self, handle: EngineHandle, x: np.ndarray):
        host_in, host_out = handle.prepare(x)
        return lambda: handle.infer(host_in, host_out)

    def device_timing(self, handle: EngineHandle, x: np.ndarray, iterations: int = 100) -> dict:
        host_in, host_out = handle.prepare(x)
        times = []
        for _ in range(iterations):
            handle.infer(host_in, host_out, events=True)
            times.append(handle.compute_ms())
        ms = np.asarray(times)
        return {"gpu_compute_ms": {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)),
                                   "p99": float(np.percentile(ms, 99))}, "runs": iterations,
                "note": "GPU time between CUDA events around execute_async_v3; latency_ms adds H2D + D2H copies"}

    def input_info(self, handle: EngineHandle) -> dict:
        name = handle.inputs[0]
        shape = list(handle.engine.get_tensor_shape(name))
        return {"name": name, "names": list(handle.inputs), "shape": shape,
                "fixed_batch": shape[0] if shape and shape[0] > 0 else None}

    def describe_environment(self, handle: EngineHandle | None = None) -> dict:
        env = host_facts()
        env["runtime"] = "tensorrt"
        try:
            trt = import_tensorrt()
            env["tensorrt_version"] = trt.__version__
            env["gpu"] = _device_name()
        except EdgekdError:
            pass
        return env


RUNNER = TensorrtRunner()
