"""The TensorRT backend without TensorRT: the build plan per release against a fake ``tensorrt``
module whose enums are copied from each release's bindings, ``build_engine`` and the runner
driven through it (the calls made; what TensorRT does with them is not tested here), the
ONNX-parser rules on hand-made graphs and on real Brevitas exports, and a run's conventions.

Nothing here proves an engine builds or runs: that needs a GPU (tests/test_backends.py,
``pytest -m tensorrt``)."""

from __future__ import annotations

import ctypes
import gc
import json
import sys
import types
from enum import IntEnum

import numpy as np
import pytest

from edgekd.backends import tensorrt as trtb
from edgekd.core.errors import EdgekdError

# --- the fake tensorrt module -------------------------------------------------------------------------
#
# NetworkDefinitionCreationFlag and BuilderFlag: the names are the ``py::enum_<...>.value("NAME", ...)``
# entries of python/src/infer/pyCore.cpp, the values those of ``enum class`` in include/NvInfer.h, both
# read from NVIDIA/TensorRT at release/8.5 (68b5072f, TensorRT 8.5.3), release/10.3 (5b990f0a),
# release/10.12 (2114dc71) and release/11.0 (93842ac9). The other enums used here are the same in all
# four releases (MemoryPoolType kWORKSPACE = 0; ProfilingVerbosity kLAYER_NAMES_ONLY/kNONE/kDETAILED =
# 0/1/2; DeviceType kGPU/kDLA = 0/1; LayerInformationFormat kONELINE/kJSON = 0/1; TensorIOMode
# kNONE/kINPUT/kOUTPUT = 0/1/2). ``builder_optimization_level`` exists from 8.6 (absent in 8.5's pyCore.cpp).

RELEASES = {
    "8.5.3": {
        "NetworkDefinitionCreationFlag": {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1},
        "BuilderFlag": {"FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "STRICT_TYPES": 4, "REFIT": 5,
                        "DISABLE_TIMING_CACHE": 6, "TF32": 7, "SPARSE_WEIGHTS": 8, "SAFETY_SCOPE": 9,
                        "OBEY_PRECISION_CONSTRAINTS": 10, "PREFER_PRECISION_CONSTRAINTS": 11, "DIRECT_IO": 12,
                        "REJECT_EMPTY_ALGORITHMS": 13, "ENABLE_TACTIC_HEURISTIC": 14},
        "builder_optimization_level": False,
    },
    "10.3.0": {
        "NetworkDefinitionCreationFlag": {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1},
        "BuilderFlag": {"FP16": 0, "BF16": 17, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4,
                        "DISABLE_TIMING_CACHE": 5, "TF32": 6, "SPARSE_WEIGHTS": 7, "SAFETY_SCOPE": 8,
                        "OBEY_PRECISION_CONSTRAINTS": 9, "PREFER_PRECISION_CONSTRAINTS": 10, "DIRECT_IO": 11,
                        "VERSION_COMPATIBLE": 13, "EXCLUDE_LEAN_RUNTIME": 14, "FP8": 15,
                        "ERROR_ON_TIMING_CACHE_MISS": 16, "DISABLE_COMPILATION_CACHE": 18, "WEIGHTLESS": 19,
                        "STRIP_PLAN": 19, "REFIT_IDENTICAL": 20, "WEIGHT_STREAMING": 21, "INT4": 22,
                        "REFIT_INDIVIDUAL": 23},
        "builder_optimization_level": True,
    },
    "10.12.0": {
        "NetworkDefinitionCreationFlag": {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_AOT_PYTHON_PLUGINS": 3,
                                          "PREFER_JIT_PYTHON_PLUGINS": 2},
        "BuilderFlag": {"FP16": 0, "BF16": 17, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4,
                        "DISABLE_TIMING_CACHE": 5, "EDITABLE_TIMING_CACHE": 27, "TF32": 6, "SPARSE_WEIGHTS": 7,
                        "SAFETY_SCOPE": 8, "OBEY_PRECISION_CONSTRAINTS": 9, "PREFER_PRECISION_CONSTRAINTS": 10,
                        "DIRECT_IO": 11, "VERSION_COMPATIBLE": 13, "EXCLUDE_LEAN_RUNTIME": 14, "FP8": 15,
                        "ERROR_ON_TIMING_CACHE_MISS": 16, "DISABLE_COMPILATION_CACHE": 18, "WEIGHTLESS": 19,
                        "STRIP_PLAN": 19, "REFIT_IDENTICAL": 20, "WEIGHT_STREAMING": 21, "INT4": 22,
                        "REFIT_INDIVIDUAL": 23, "STRICT_NANS": 24, "MONITOR_MEMORY": 25, "FP4": 26,
                        "DISTRIBUTIVE_INDEPENDENCE": 28},
        "builder_optimization_level": True,
    },
    "11.0.0": {
        "NetworkDefinitionCreationFlag": {"STRONGLY_TYPED": 0, "PREFER_AOT_PYTHON_PLUGINS": 2,
                                          "PREFER_JIT_PYTHON_PLUGINS": 1},
        "BuilderFlag": {"DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5,
                        "EDITABLE_TIMING_CACHE": 26, "TF32": 6, "SPARSE_WEIGHTS": 7, "SAFETY_SCOPE": 8,
                        "DIRECT_IO": 11, "VERSION_COMPATIBLE": 12, "EXCLUDE_LEAN_RUNTIME": 13,
                        "ERROR_ON_TIMING_CACHE_MISS": 15, "DISABLE_COMPILATION_CACHE": 17, "STRIP_PLAN": 18,
                        "REFIT_IDENTICAL": 19, "WEIGHT_STREAMING": 20, "REFIT_INDIVIDUAL": 22, "STRICT_NANS": 23,
                        "MONITOR_MEMORY": 24, "DISTRIBUTIVE_INDEPENDENCE": 27},
        "builder_optimization_level": True,
    },
}
INPUT_SHAPE = (-1, 1, 8, 8)
CLASSES = 10


class Recorder:
    """Everything the fakes were asked to do, in order."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.loggers = 0
        self.accept_shapes = True  # what IExecutionContext.set_input_shape returns
        self.dla_ok: dict[str, bool] = {}  # layer name -> IBuilderConfig.can_run_on_DLA
        self.engine_layers: list = []  # what the engine inspector reports
        self.num_dla_cores = 2

    def __call__(self, *call):
        self.calls.append(call)

    def named(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]


def fake_tensorrt(version: str, rec: Recorder) -> types.ModuleType:
    rel = RELEASES[version]
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.NetworkDefinitionCreationFlag = IntEnum("NetworkDefinitionCreationFlag", rel["NetworkDefinitionCreationFlag"])
    trt.BuilderFlag = IntEnum("BuilderFlag", rel["BuilderFlag"])
    trt.MemoryPoolType = IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    trt.ProfilingVerbosity = IntEnum("ProfilingVerbosity", {"LAYER_NAMES_ONLY": 0, "NONE": 1, "DETAILED": 2})
    trt.DeviceType = IntEnum("DeviceType", {"GPU": 0, "DLA": 1})
    trt.LayerInformationFormat = IntEnum("LayerInformationFormat", {"ONELINE": 0, "JSON": 1})
    trt.TensorIOMode = IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    trt.DataType = IntEnum("DataType", {"FLOAT": 0})
    trt.nptype = lambda dtype: np.float32

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            rec.loggers += 1
            rec("Logger", severity)

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Layer:
        def __init__(self, name, kind):
            self.name, self.type = name, f"LayerType.{kind}"

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.inputs = [Tensor("input", INPUT_SHAPE)]
            self.layers = [Layer(n, k) for n, k in (("conv1", "CONVOLUTION"), ("relu1", "ACTIVATION"),
                                                    ("pool", "POOLING"), ("fc", "MATRIX_MULTIPLY"),
                                                    ("softmax", "SOFTMAX"))]
            self.num_inputs, self.num_layers = len(self.inputs), len(self.layers)

        def get_input(self, i):
            return self.inputs[i]

        def get_layer(self, i):
            return self.layers[i]

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            rec("set_shape", name, tuple(lo), tuple(opt), tuple(hi))

    class TimingCache:
        def serialize(self):
            return b"cache"

    class Config:
        def __init__(self):
            if rel["builder_optimization_level"]:
                self.builder_optimization_level = 3
            self.profiling_verbosity = None
            self.default_device_type = trt.DeviceType.GPU
            self.DLA_core = -1

        def set_memory_pool_limit(self, pool, size):
            rec("set_memory_pool_limit", pool, size)

        def set_flag(self, flag):
            rec("set_flag", flag)

        def add_optimization_profile(self, profile):
            rec("add_optimization_profile")

        def create_timing_cache(self, blob):
            return TimingCache()

        def set_timing_cache(self, cache, ignore_mismatch):
            rec("set_timing_cache", ignore_mismatch)

        def get_timing_cache(self):
            return TimingCache()

        def can_run_on_DLA(self, layer):
            return rec.dla_ok.get(layer.name, True)

    class Builder:
        def __init__(self, logger):
            rec("Builder", logger)
            self.num_DLA_cores = rec.num_dla_cores

        def create_network(self, flags=0):
            rec("create_network", flags)
            return Network(flags)

        def create_builder_config(self):
            rec.config = Config()
            return rec.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            rec("build_serialized_network")
            return b"engine"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            rec("OnnxParser", logger)

        def parse_from_file(self, path):
            return True

    class Inspector:
        def get_engine_information(self, fmt):
            return json.dumps({"Layers": rec.engine_layers})

    class Context:
        def __init__(self):
            self.batch = None

        def set_input_shape(self, name, shape):
            rec("set_input_shape", name, tuple(shape))
            if rec.accept_shapes:
                self.batch = shape[0]
            return rec.accept_shapes

        def get_tensor_shape(self, name):  # -1 until an input shape is accepted
            return (self.batch if self.batch is not None else -1, CLASSES)

        def set_tensor_address(self, name, ptr):
            rec("set_tensor_address", name, ptr)

        def execute_async_v3(self, stream):
            rec("execute_async_v3", stream)
            return True

    class Engine:
        num_io_tensors = 2
        names = ("input", "logits")

        def create_engine_inspector(self):
            return Inspector()

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "input" else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return trt.DataType.FLOAT

        def get_tensor_shape(self, name):
            return INPUT_SHAPE if name == "input" else (-1, CLASSES)

        def get_tensor_profile_shape(self, name, index):
            lo, opt, hi = rec.profile
            return [(lo, 1, 8, 8), (opt, 1, 8, 8), (hi, 1, 8, 8)]

        def create_execution_context(self):
            return Context()

    class Runtime:
        num_DLA_cores = 2

        def __init__(self, logger):
            rec("Runtime", logger)
            self.DLA_core = -1

        def deserialize_cuda_engine(self, blob):
            rec("deserialize_cuda_engine", self.DLA_core)
            return Engine()

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    return trt


def fake_cudart(rec: Recorder) -> types.ModuleType:
    """cuda-python's runtime bindings: every call returns (error, value...) with error 0."""
    cudart = types.ModuleType("cuda.bindings.runtime")
    cudart.cudaMemcpyKind = IntEnum("cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2})
    rec.live: dict[str, set] = {"memory": set(), "events": set(), "streams": set()}
    ids = iter(range(1000, 10**6))

    def create(kind):
        def fn():
            handle = next(ids)
            rec.live[kind].add(handle)
            rec(fn.__name__)
            return 0, handle
        return fn

    def destroy(kind, name):
        def fn(handle):
            rec(name, handle)
            rec.live[kind].discard(handle)
            return (0,)
        fn.__name__ = name
        return fn

    cudart.cudaStreamCreate, cudart.cudaEventCreate = create("streams"), create("events")
    cudart.cudaStreamCreate.__name__, cudart.cudaEventCreate.__name__ = "cudaStreamCreate", "cudaEventCreate"
    cudart.cudaStreamDestroy = destroy("streams", "cudaStreamDestroy")
    cudart.cudaEventDestroy = destroy("events", "cudaEventDestroy")
    cudart.cudaFree = destroy("memory", "cudaFree")

    def cudaMalloc(nbytes):
        ptr = next(ids)
        rec.live["memory"].add(ptr)
        rec("cudaMalloc", nbytes)
        return 0, ptr

    def cudaMemcpyAsync(dst, src, nbytes, kind, stream):
        if kind == cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost:
            ctypes.memset(dst, 0, nbytes)  # the "device" returns zeros
        return (0,)

    class Props:
        name = b"Orin (nvgpu)"

    cudart.cudaMalloc, cudart.cudaMemcpyAsync = cudaMalloc, cudaMemcpyAsync
    cudart.cudaStreamSynchronize = lambda stream: (0,)
    cudart.cudaEventRecord = lambda event, stream: (0,)
    cudart.cudaEventElapsedTime = lambda start, end: (0, 0.25)
    cudart.cudaGetDeviceProperties = lambda device: (0, Props())
    return cudart


@pytest.fixture
def fake(monkeypatch):
    """``fake(version)`` installs that release's fake ``tensorrt`` (and cuda-python) in sys.modules
    and returns the Recorder; the process-wide logger is reset for the test."""
    rec = Recorder()
    rec.profile = (1, 1, 64)
    monkeypatch.setattr(trtb.build, "_LOGGER", None)

    def install(version: str) -> Recorder:
        rec.trt = fake_tensorrt(version, rec)
        cudart = fake_cudart(rec)
        bindings = types.ModuleType("cuda.bindings")
        bindings.runtime = cudart
        cuda = types.ModuleType("cuda")
        cuda.bindings = bindings
        for name, module in (("tensorrt", rec.trt), ("cuda", cuda), ("cuda.bindings", bindings),
                             ("cuda.bindings.runtime", cudart)):
            monkeypatch.setitem(sys.modules, name, module)
        return rec

    return install


# --- the build plan per release -------------------------------------------------------------------------

# release, network creation flags (names; the create_network argument), builder flags, strongly typed
PLANS = [
    ("8.5.3", ["EXPLICIT_BATCH"], 1 << 0, ["INT8", "FP16"], False),  # Xavier, JetPack 5.1
    ("10.3.0", [], 0, ["INT8", "FP16"], False),  # JetPack 6: always explicit batch, no flag
    ("10.12.0", ["STRONGLY_TYPED"], 1 << 1, [], True),  # weak typing deprecated
    ("11.0.0", [], 0, [], True),  # always strongly typed; INT8/FP16 flags removed
]


@pytest.mark.parametrize("version, names, flags, builder_flags, typed", PLANS)
def test_build_plan_per_release(fake, version, names, flags, builder_flags, typed):
    rec = fake(version)
    plan = trtb.build_plan(version, {"fp16": True}, batch_sizes=(1, 8, 64))
    assert (plan.network_flags, plan.builder_flags, plan.strongly_typed) == (names, builder_flags, typed)
    assert plan.creation_flags(rec.trt) == flags
    assert plan.network_flag == ("STRONGLY_TYPED" in names)
    for name in plan.builder_flags:  # every flag the plan sets exists in that release's bindings
        assert hasattr(rec.trt.BuilderFlag, name)
    assert plan.batch_profile == (1, 1, 64)  # min = smallest, opt = batch 1, max = largest


def test_release_enums_are_what_the_plan_relies_on(fake):
    """The facts behind the branches, on the copied enums: no EXPLICIT_BATCH in 11.0 and no
    INT8/FP16 flags; STRONGLY_TYPED changes value between 10.x (1) and 11.0 (0)."""
    assert not hasattr(fake("11.0.0").trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    assert not hasattr(fake("11.0.0").trt.BuilderFlag, "INT8") and not hasattr(fake("11.0.0").trt.BuilderFlag, "FP16")
    assert int(fake("10.12.0").trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 1
    assert int(fake("11.0.0").trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 0
    assert not hasattr(fake("8.5.3").trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")


@pytest.mark.parametrize("sizes, opt, expected", [
    ((1, 8, 32, 128), None, (1, 1, 128)),  # batch 1 benched: opt 1
    ((8, 4, 32), None, (4, 8, 32)),  # no batch 1: the profile's first batch size
    ((1, 64), 8, (1, 8, 64)),
])
def test_batch_profile(sizes, opt, expected):
    assert trtb.batch_profile(sizes, opt) == expected


def test_batch_profile_refuses_nonsense():
    with pytest.raises(EdgekdError):
        trtb.batch_profile(())
    with pytest.raises(EdgekdError, match="outside"):
        trtb.batch_profile((1, 8), 64)


@pytest.mark.parametrize("version", list(RELEASES))
def test_dla_plan_is_static_with_fallback(version):
    plan = trtb.build_plan(version, {"dla_core": 1, "gpu_fallback": True}, dla_cores=2, batch_sizes=(1, 8, 32, 128))
    assert plan.batch_profile == (1, 1, 1)  # DLA: min = opt = max
    assert plan.dla_core == 1 and "GPU_FALLBACK" in plan.builder_flags and plan.precision.endswith("+dla1")
    assert any("static shape" in n for n in plan.notes)
    nano = trtb.build_plan(version, {"dla_core": 0}, dla_cores=0, batch_sizes=(1, 64))  # Orin Nano: no DLA
    assert nano.dla_core == -1 and nano.batch_profile == (1, 1, 64) and "dla" not in nano.precision


# --- build_engine through the fake bindings ---------------------------------------------------------------

def _onnx(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"onnx")  # the fake parser does not read it
    return path


@pytest.mark.parametrize("version, names, flags, builder_flags, typed", PLANS)
def test_build_engine_calls(fake, tmp_path, version, names, flags, builder_flags, typed):
    rec = fake(version)
    log = []
    build = trtb.build_engine(_onnx(tmp_path), tmp_path, {"fp16": True, "workspace_mb": 256}, None, (1, 8, 64),
                              log.append)
    trt = rec.trt
    assert rec.named("create_network") == [("create_network", flags)]
    assert [c[1] for c in rec.named("set_flag")] == [getattr(trt.BuilderFlag, n) for n in builder_flags]
    assert rec.named("set_memory_pool_limit") == [("set_memory_pool_limit", trt.MemoryPoolType.WORKSPACE, 256 << 20)]
    assert rec.named("set_shape") == [("set_shape", "input", (1, 1, 8, 8), (1, 1, 8, 8), (64, 1, 8, 8))]
    assert rec.named("add_optimization_profile") and rec.named("set_timing_cache") == [("set_timing_cache", False)]
    assert rec.config.profiling_verbosity == trt.ProfilingVerbosity.DETAILED
    assert hasattr(rec.config, "builder_optimization_level") == RELEASES[version]["builder_optimization_level"]
    assert (tmp_path / trtb.ENGINE_FILE).read_bytes() == b"engine" and (tmp_path / trtb.LAYERS_FILE).is_file()
    assert build["timing_cache"] == f"timing-orin-nvgpu-trt{version}-{build['precision'].replace('+', '-')}.cache"
    assert build["plan"]["network_flags"] == names and build["batch_profile"] == [1, 1, 64]
    assert "dla" not in build and rec.config.default_device_type == trt.DeviceType.GPU
    assert rec.loggers == 1  # builder, parser and runtime share the one logger
    assert len({id(c[1]) for c in rec.calls if c[0] in ("Builder", "OnnxParser", "Runtime")}) == 1
    assert any("building a TensorRT" in line for line in log)


def _dla_build(rec, tmp_path, **options):
    return trtb.build_engine(_onnx(tmp_path), tmp_path, {"dla_core": 0, "gpu_fallback": True} | options, 2,
                             (1, 8, 32, 128))


def test_dla_build_is_static_and_reports_fallback(fake, tmp_path):
    rec = fake("10.3.0")
    rec.dla_ok = {"softmax": False}
    rec.engine_layers = [{"Name": "{ForeignNode[conv1...fc]}", "LayerType": "DLA"},
                         {"Name": "softmax", "LayerType": "Softmax"}]
    build = _dla_build(rec, tmp_path)
    trt = rec.trt
    assert rec.named("set_shape") == [("set_shape", "input", (1, 1, 8, 8), (1, 1, 8, 8), (1, 1, 8, 8))]
    assert rec.config.default_device_type == trt.DeviceType.DLA and rec.config.DLA_core == 0
    assert trt.BuilderFlag.GPU_FALLBACK in [c[1] for c in rec.named("set_flag")]
    dla = build["dla"]
    assert (dla["layers"], dla["layers_on_dla"], dla["layers_fell_back"]) == (5, 4, 1)
    assert dla["fallback_layers"] == ["softmax"] and dla["runs_on"] == "dla+gpu" and dla["engine_dla_layers"] == 1
    assert {p["name"]: p["device"] for p in dla["placement"]}["softmax"] == "GPU"
    assert build["precision"] == "int8+fp16+dla0" and dla["batch"] == 1


@pytest.mark.parametrize("dla_ok, engine_layers, why", [
    ({n: False for n in ("conv1", "relu1", "pool", "fc", "softmax")}, [], "no layer of the network can run"),
    ({}, [{"Name": "conv1 + relu1", "LayerType": "CaskConvolution"}], "the engine inspector names no DLA layer"),
])
def test_dla_build_that_runs_on_the_gpu_says_so(fake, tmp_path, dla_ok, engine_layers, why):
    rec = fake("10.3.0")
    rec.dla_ok, rec.engine_layers = dla_ok, engine_layers
    build = _dla_build(rec, tmp_path)
    assert build["dla"]["runs_on"] == "gpu" and why in build["dla"]["note"]
    assert "every layer fell back to the GPU" in build["dla"]["note"]
    assert "dla" not in build["precision"]  # a bench row must not claim +dla


def test_dla_without_fallback_refuses_layers_the_dla_cannot_run(fake, tmp_path):
    rec = fake("8.5.3")
    rec.dla_ok = {"softmax": False}
    with pytest.raises(EdgekdError, match="gpu_fallback is off: softmax"):
        _dla_build(rec, tmp_path, gpu_fallback=False)
    assert not rec.named("build_serialized_network")


def test_dla_summary_without_inspector_details():
    plan = trtb.build_plan("10.3", {"dla_core": 0}, dla_cores=1)
    placement = [{"name": "a", "device": "DLA"}, {"name": "b", "device": "DLA"}]
    summary = trtb.dla_summary(plan, placement, {"Layers": ["a", "b"]})  # names only: cannot tell
    assert summary["runs_on"] == "dla" and summary["engine_dla_layers"] is None and "did not say" in summary["note"]


# --- the runner through the fake bindings ----------------------------------------------------------------

def _handle(rec, tmp_path, **options):
    path = tmp_path / "model.engine"
    path.write_bytes(b"engine")
    return trtb.RUNNER.load(path, 0, options)


def test_refused_input_shape_is_one_clear_error(fake, tmp_path):
    rec = fake("10.3.0")
    handle = _handle(rec, tmp_path)
    rec.accept_shapes = False  # IExecutionContext.set_input_shape returns False
    with pytest.raises(EdgekdError) as e:
        trtb.RUNNER.timed_call(handle, np.zeros((8, 1, 8, 8), np.float32))
    assert "TensorRT refused batch 8" in e.value.message and "batch 1..64" in e.value.message
    assert not rec.named("cudaMalloc")  # nothing reached numpy or the device with a -1 shape


def test_batch_outside_the_profile_is_refused_before_tensorrt(fake, tmp_path):
    rec = fake("10.3.0")
    handle = _handle(rec, tmp_path)
    with pytest.raises(EdgekdError) as e:
        trtb.RUNNER.device_timing(handle, np.zeros((256, 1, 8, 8), np.float32), iterations=1)
    assert "batch 256" in e.value.message and "1..64" in e.value.message and "edgekd compile" in e.value.hint
    assert not rec.named("set_input_shape")


def test_run_splits_at_the_profile_max(fake, tmp_path):
    rec = fake("10.3.0")
    handle = _handle(rec, tmp_path)
    logits = trtb.RUNNER.run(handle, np.ones((150, 1, 8, 8), np.float32))
    assert logits.shape == (150, CLASSES) and logits.dtype == np.float32
    assert [c[2][0] for c in rec.named("set_input_shape")] == [64, 64, 22]
    assert trtb.RUNNER.input_info(handle) == {"name": "input", "names": ["input"], "shape": list(INPUT_SHAPE),
                                              "batch_range": [1, 64], "fixed_batch": None}


def test_static_dla_engine_takes_its_one_batch(fake, tmp_path):
    rec = fake("10.3.0")
    rec.profile = (4, 4, 4)
    handle = _handle(rec, tmp_path, dla_core=1)
    assert rec.named("deserialize_cuda_engine") == [("deserialize_cuda_engine", 1)]  # IRuntime.DLA_core set first
    assert trtb.RUNNER.input_info(handle)["fixed_batch"] == 4
    logits = trtb.RUNNER.run(handle, np.ones((6, 1, 8, 8), np.float32))  # 4 + 2 padded to 4
    assert logits.shape == (6, CLASSES) and [c[2][0] for c in rec.named("set_input_shape")] == [4, 4]
    with pytest.raises(EdgekdError, match="accepts batch 4") as e:
        trtb.RUNNER.timed_call(handle, np.zeros((1, 1, 8, 8), np.float32))
    assert "DLA engine takes one batch size" in e.value.hint


def test_one_logger_per_process(fake, tmp_path):
    rec = fake("10.12.0")
    trtb.build_engine(_onnx(tmp_path), tmp_path, {}, None, (1, 64))
    trtb.build_engine(_onnx(tmp_path), tmp_path, {}, None, (1, 64))
    first, second = _handle(rec, tmp_path), _handle(rec, tmp_path)
    assert rec.loggers == 1 and trtb.build._logger(rec.trt) is trtb.build._LOGGER
    first.close(), second.close()


def test_close_frees_buffers_events_and_stream(fake, tmp_path):
    rec = fake("10.3.0")
    handle = _handle(rec, tmp_path)
    trtb.RUNNER.run(handle, np.ones((8, 1, 8, 8), np.float32))
    trtb.RUNNER.device_timing(handle, np.ones((16, 1, 8, 8), np.float32), iterations=2)  # buffers grow
    assert rec.live["memory"] and len(rec.live["events"]) == 2 and len(rec.live["streams"]) == 1
    trtb.RUNNER.unload(handle)
    assert rec.live == {"memory": set(), "events": set(), "streams": set()}
    assert handle.context is None and handle.engine is None and handle.runtime is None
    frees = len(rec.named("cudaFree"))
    handle.close()  # idempotent
    assert len(rec.named("cudaFree")) == frees
    with pytest.raises(EdgekdError, match="closed"):
        trtb.RUNNER.run(handle, np.ones((1, 1, 8, 8), np.float32))


def test_handle_dropped_without_close_is_freed(fake, tmp_path):
    rec = fake("8.5.3")
    handle = _handle(rec, tmp_path)
    trtb.RUNNER.run(handle, np.ones((2, 1, 8, 8), np.float32))
    del handle
    gc.collect()
    assert rec.live == {"memory": set(), "events": set(), "streams": set()}


# --- TensorRT's Q/DQ rules on hand-made graphs ---------------------------------------------------------------

def _graph(nodes, inits, opset=13):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _qdq(zp, scale=0.1, prefix="a"):
    from onnx import helper

    return [helper.make_node("QuantizeLinear", ["x", f"{prefix}_s", f"{prefix}_z"], [f"{prefix}_q"], name=f"{prefix}Q"),
            helper.make_node("DequantizeLinear", [f"{prefix}_q", f"{prefix}_s", f"{prefix}_z"], ["y"],
                             name=f"{prefix}DQ")], {f"{prefix}_s": np.float32(scale), f"{prefix}_z": zp}


def test_signed_symmetric_activation_passes():
    nodes, inits = _qdq(np.int8(0))
    assert trtb.check_qdq_rules(_graph(nodes, inits)) == []


def test_uint8_with_zero_point_128_is_flagged():
    nodes, inits = _qdq(np.uint8(128))
    problems = trtb.check_qdq_rules(_graph(nodes, inits))
    assert any("aQ: uint8 zero point" in p for p in problems) and any("zero point 128, not 0" in p for p in problems)


def test_nonzero_int8_zero_point_and_negative_scale_are_flagged():
    nodes, inits = _qdq(np.int8(3), scale=-0.1)
    problems = trtb.check_qdq_rules(_graph(nodes, inits))
    assert any("zero point 3, not 0" in p for p in problems) and any("positive" in p for p in problems)


def test_two_input_qdq_is_flagged():
    from onnx import helper

    nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="Q"),
             helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="DQ")]
    problems = trtb.check_qdq_rules(_graph(nodes, {"s": np.float32(0.1)}))
    assert len(problems) == 2 and all("requires 3" in p for p in problems)


def _conv(w_dtype=np.int8, axis=0, scale_shape=(4,), op="Conv", bias=None, **attrs):
    from onnx import helper

    w = np.ones((4, 4, 1, 1) if op == "Conv" else (4, 4), w_dtype)
    nodes = [helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], name="wDQ",
                              **({} if axis is None else {"axis": axis})),
             helper.make_node(op, ["x", "wf"] + (["bf"] if bias is not None else []), ["y"], name=op, **attrs)]
    inits = {"w": w, "ws": np.full(scale_shape, 0.1, np.float32), "wz": np.zeros(scale_shape, w_dtype)}
    if bias is not None:
        nodes.insert(0, helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bf"], name="bDQ", axis=0))
        inits |= {"b": bias, "bs": np.full((4,), 0.01, np.float32), "bz": np.zeros((4,), bias.dtype)}
    return _graph(nodes, inits)


def test_per_channel_weights_on_the_output_channel_axis_pass():
    assert trtb.check_qdq_rules(_conv()) == []  # Conv W (M, C, kH, kW): axis 0
    assert trtb.check_qdq_rules(_conv(op="Gemm", transB=1)) == []  # Gemm B (N, K): axis 0
    assert trtb.check_qdq_rules(_conv(op="Gemm", axis=1)) == []  # Gemm B (K, N): axis 1
    assert trtb.check_qdq_rules(_conv(op="MatMul", axis=1)) == []  # MatMul B (K, N): last axis


def test_per_channel_on_the_wrong_axis_or_without_one_is_flagged():
    assert any("axis 1; the output channels of Conv's weight are axis 0" in p
               for p in trtb.check_qdq_rules(_conv(axis=1)))
    assert any("axis 0; the output channels of Gemm's weight are axis 1" in p
               for p in trtb.check_qdq_rules(_conv(op="Gemm", axis=0)))
    assert any("without an axis attribute" in p for p in trtb.check_qdq_rules(_conv(axis=None)))


def test_int32_bias_and_uint8_weights_are_flagged():
    problems = trtb.check_qdq_rules(_conv(bias=np.arange(4, dtype=np.int32)))
    assert problems == [("DequantizeLinear bDQ: int32 input (an int32 bias); TensorRT's parser dequantizes int8 "
                         "only: keep the bias float (QuantSpec bias='float')")]
    assert any("uint8 input" in p for p in trtb.check_qdq_rules(_conv(w_dtype=np.uint8)))


def test_per_channel_activation_is_flagged():
    nodes, inits = _qdq(np.zeros(4, np.int8))
    inits["a_s"] = np.full(4, 0.1, np.float32)
    nodes[0].attribute.extend(nodes[1].attribute)
    problems = trtb.check_qdq_rules(_graph(nodes, inits))
    assert any("per tensor only" in p for p in problems)


# --- a run's conventions ---------------------------------------------------------------------------------

def test_run_conventions():
    assert trtb.check_run_conventions({"act_after_relu": "signed", "bias": "float", "weight_scaling": "per_tensor",
                                       "scale_type": "po2"}) is None
    ort = trtb.check_run_conventions({"act_after_relu": "unsigned", "bias": "int32"})
    assert "uint8 with zero point 128" in ort and "int32" in ort and "act_after_relu='signed'" in ort
    assert "int32" in trtb.check_run_conventions({"act_after_relu": "signed", "bias": "int32"})
    assert trtb.check_run_conventions({}) is not None  # QuantSpec's defaults are ONNX Runtime's conventions


# --- real Brevitas exports ---------------------------------------------------------------------------------
#
# RE-POINT HERE: the only place these tests touch the rest of edgekd (export, quant, models, catalog),
# which the structure refactor is moving (see /work/plan/LAYOUT.md). Imports as of edgekd/export/onnx.py,
# edgekd/quant/, edgekd/models/ and edgekd/catalog/.

SHAPE = (1, 8, 8)


def _exported(tmp_path, arch: str, target: str, weight_bits: int = 8):
    torch = pytest.importorskip("torch")
    from edgekd.catalog import load_target
    from edgekd.export.onnx import export_onnx
    from edgekd.models import build_model, random_passes
    from edgekd.quant import quantize, spec_for_target

    spec = spec_for_target(load_target(target), weight_bits, 8)
    torch.manual_seed(0)
    model = random_passes(quantize(build_model(arch, 10, SHAPE), spec), SHAPE, steps=4, batch=32)
    path = tmp_path / f"{arch}-{target}.onnx"
    export_onnx(model, "qdq", torch.zeros(1, *SHAPE), path, 13)
    return spec, path


@pytest.mark.parametrize("arch, weight_bits", [("cnn-student", 8), ("resnet-student", 4)])
def test_tensorrt_int8_export_follows_the_parser_rules(tmp_path, arch, weight_bits):
    import onnx

    spec, path = _exported(tmp_path, arch, "tensorrt-int8", weight_bits)
    assert trtb.check_run_conventions(spec.to_dict()) is None
    assert trtb.check_qdq_rules(path) == []
    model = onnx.load(str(path))
    consts = trtb.rules._constants(model)
    per_channel = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and consts[n.input[1]].size > 1]
    assert per_channel  # the per-channel rule was exercised, not vacuous


def test_onnxruntime_cpu_export_is_flagged(tmp_path):
    spec, path = _exported(tmp_path, "cnn-student", "onnxruntime-cpu")
    assert trtb.check_run_conventions(spec.to_dict()) is not None
    problems = trtb.check_qdq_rules(path)
    assert any("uint8 zero point" in p for p in problems)
    assert any("zero point 128, not 0" in p for p in problems)
    assert any("int32 input (an int32 bias)" in p for p in problems)


def test_backend_refuses_at_export(tmp_path):
    """TensorrtBackend's export hooks (edgekd/backends/__init__.py Backend.check_run and compile)."""
    from types import SimpleNamespace

    spec, path = _exported(tmp_path, "cnn-student", "onnxruntime-cpu")
    assert "zero point 128" in trtb.BACKEND.check_run(spec.to_dict(), None)
    ctx = SimpleNamespace(target=SimpleNamespace(name="tensorrt-int8"), log=lambda s: None)
    with pytest.raises(EdgekdError, match="explicit-quantization rules") as e:
        trtb.BACKEND.compile(path, ctx)
    assert "act_after_relu = 'signed'" in e.value.hint
