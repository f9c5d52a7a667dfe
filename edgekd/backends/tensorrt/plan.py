"""What to build for a TensorRT version and a target's options (pure: testable without TensorRT),
and the installs it needs."""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass, field


from ...core.errors import EdgekdError, MissingExtraError


ENGINE_FILE = "model.engine"
LAYERS_FILE = "engine_layers.json"
EXPLICIT_BATCH_BEFORE = (10, 0)  # 8.x: EXPLICIT_BATCH must be set; 10.x: deprecated, ignored
STRONG_TYPING_FROM = (10, 12)  # weak typing (BuilderFlag INT8/FP16) deprecated
ALWAYS_STRONG_FROM = (11, 0)  # STRONGLY_TYPED deprecated (always on); INT8/FP16 flags removed
EXTRA_HINT = ("pip install 'edgekd[tensorrt]' on an x86-64 workstation; on a Jetson, TensorRT's Python bindings "
              "come with JetPack (apt install python3-libnvinfer) in the system Python: create the venv with "
              "--system-site-packages")


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
    ``cuda.cudart`` before; 13.x has only the former); the engine runner needs them for device
    memory, streams and events."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            error = MissingExtraError("cuda-python", "tensorrt", "running a TensorRT engine")
            if platform.machine() == "aarch64":
                error.hint = ("install cuda-python whose major version is JetPack's CUDA: JetPack 6 (CUDA 12.x): "
                              "pip install 'cuda-python>=12,<13'")
            else:
                error.hint = ("install it with: pip install 'edgekd[tensorrt]' (cuda-python's major version must be "
                              "the CUDA major version of the installed TensorRT: 12 for TensorRT 10, 13 for 11)")
            raise error from None
    return cudart


def version_tuple(version: str) -> tuple[int, int]:
    major, minor = (re.findall(r"\d+", version) + ["0", "0"])[:2]
    return int(major), int(minor)


# --- what to build (pure: testable without TensorRT) -----------------------------------------------

@dataclass
class BuildPlan:
    trt_version: str
    strongly_typed: bool  # created STRONGLY_TYPED (10.12..10.x) or always so (11.x)
    network_flags: list[str] = field(default_factory=list)  # NetworkDefinitionCreationFlag names passed
    builder_flags: list[str] = field(default_factory=list)  # BuilderFlag names to set
    dla_core: int = -1
    gpu_fallback: bool = False
    precision: str = "int8"
    batch_profile: tuple[int, int, int] | None = None  # (min, opt, max) of a dynamic batch dimension
    notes: list[str] = field(default_factory=list)

    @property
    def network_flag(self) -> bool:
        """Whether STRONGLY_TYPED is passed explicitly (10.12 <= version < 11)."""
        return "STRONGLY_TYPED" in self.network_flags

    def creation_flags(self, trt) -> int:
        """The ``flags`` argument of ``Builder.create_network``: ``1 << int(flag)`` per named flag,
        the values read from the installed bindings (they differ between releases: STRONGLY_TYPED
        is 1 in 10.x and 0 in 11.0)."""
        flags = 0
        for name in self.network_flags:
            flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
        return flags


def batch_profile(batch_sizes, opt_batch: int | None = None) -> tuple[int, int, int]:
    """(min, opt, max) over ``batch_sizes``: opt = ``opt_batch``, else batch 1 when it is benched,
    else the first batch size given (a profile's bench list names its main case first)."""
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes):
        raise EdgekdError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    lo, hi = min(sizes), max(sizes)
    opt = int(opt_batch) if opt_batch is not None else (1 if 1 in sizes else sizes[0])
    if not lo <= opt <= hi:
        raise EdgekdError(f"the optimization profile's opt batch {opt} is outside its batch sizes {lo}..{hi}")
    return lo, opt, hi


def build_plan(trt_version: str, options: dict, dla_cores: int = 0, batch_sizes=(1,),
               opt_batch: int | None = None) -> BuildPlan:
    """The network creation flags, typing, builder flags, DLA use and batch profile for
    ``trt_version`` and the target's options (``fp16``, ``dla_core``, ``gpu_fallback``);
    ``dla_cores`` is what the device has (profile ``hardware.accelerator.dla_cores``, or
    ``builder.num_DLA_cores`` on the device); ``batch_sizes`` the ones bench will run."""
    version = version_tuple(trt_version)
    fp16 = bool(options.get("fp16", True))
    plan = BuildPlan(trt_version, strongly_typed=version >= STRONG_TYPING_FROM)
    if version < EXPLICIT_BATCH_BEFORE:
        plan.network_flags.append("EXPLICIT_BATCH")  # the 8.x ONNX parser refuses implicit batch networks
    elif STRONG_TYPING_FROM <= version < ALWAYS_STRONG_FROM:
        plan.network_flags.append("STRONGLY_TYPED")
    if not plan.strongly_typed:
        plan.builder_flags.append("INT8")  # weak typing: Q/DQ layers need the INT8 flag
        if fp16:
            plan.builder_flags.append("FP16")
        plan.precision = "int8+fp16" if fp16 else "int8"
    elif fp16:
        plan.notes.append(f"TensorRT {trt_version} builds strongly typed networks: float layers keep their ONNX "
                          "type (FP32); option fp16 is ignored")
    lo, opt, hi = batch_profile(batch_sizes, opt_batch)
    plan.batch_profile = (lo, opt, hi)
    dla = int(options.get("dla_core", -1))
    if dla >= 0:
        if dla >= dla_cores:
            plan.notes.append(f"dla_core {dla} requested but the device has {dla_cores} DLA core(s): building for the GPU")
        else:
            plan.dla_core = dla
            plan.precision += f"+dla{dla}"
            plan.gpu_fallback = bool(options.get("gpu_fallback", True))
            if plan.gpu_fallback:
                plan.builder_flags.append("GPU_FALLBACK")
            plan.batch_profile = (opt, opt, opt)  # DLA: min = opt = max (static shape)
            plan.notes.append(f"DLA needs a static shape: the engine is built for batch {opt} only "
                              "(min = opt = max); other batch sizes are refused when benched")
            if plan.strongly_typed:
                plan.notes.append("strongly typed network on DLA: layers left in FP32 (outside Q/DQ pairs) cannot "
                                  "run on the DLA (INT8/FP16 only) and fall back to the GPU")
    return plan


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def timing_cache_name(device_name: str, trt_version: str, precision: str, base: str = "timing.cache") -> str:
    """Timing cache file name keyed by GPU name, TensorRT version and precision: a cache from
    another device or version is never reused (TensorRT rejects mismatched caches anyway). ``base``
    is a plain file name: the cache is written next to the engine, never elsewhere."""
    if base in (".", "..") or "/" in base or "\\" in base or "\0" in base:
        raise EdgekdError(f"timing_cache {base!r} is not a file name (it would be written outside the bundle)",
                          "give a plain file name, e.g. timing.cache")
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


def engine_dla_layers(engine_info: dict | str) -> list[str] | None:
    """Names of the engine layers the inspector places on the DLA, or None when it cannot tell
    (verbosity below DETAILED: no "LayerType"). A DLA subgraph is one engine layer, a
    ``{ForeignNode[first...last]}`` whose type names the DLA (trtexec prints it as ``[DlaLayer]``,
    samples/sampleCudla/README.md); Myelin subgraphs are ForeignNodes too, so the name alone is
    not taken as proof. UNVERIFIED: the exact "LayerType" string of a DLA layer has not been seen
    on a device; anything containing "dla" counts."""
    info = json.loads(engine_info) if isinstance(engine_info, str) else engine_info
    layers = [la for la in info.get("Layers", []) if isinstance(la, dict)]
    if not layers or not any("LayerType" in la for la in layers):
        return None
    return [str(la.get("Name", "?")) for la in layers if "dla" in str(la.get("LayerType", "")).lower()]


def dla_summary(plan: BuildPlan, placement: list[dict], engine_info: dict | str | None = None) -> dict:
    """Where a DLA build runs: per network layer DLA or GPU (``placement``, from
    ``IBuilderConfig.can_run_on_DLA``), how many fell back to the GPU, and what the engine
    inspector confirms. ``runs_on`` is "dla", "dla+gpu" or "gpu"; ``precision`` drops ``+dla``
    when nothing runs on the DLA, so a bench row never claims a DLA the network does not use."""
    on_dla = [p["name"] for p in placement if p["device"] == "DLA"]
    on_gpu = [p["name"] for p in placement if p["device"] != "DLA"]
    engine_dla = engine_dla_layers(engine_info) if engine_info is not None else None
    summary = {"core": plan.dla_core, "gpu_fallback": plan.gpu_fallback, "batch": plan.batch_profile[1],
               "layers": len(placement), "layers_on_dla": len(on_dla), "layers_fell_back": len(on_gpu),
               "fallback_layers": on_gpu, "engine_dla_layers": None if engine_dla is None else len(engine_dla)}
    dla_tag = f"+dla{plan.dla_core}"
    if not on_dla or engine_dla == []:
        why = ("no layer of the network can run on the DLA" if not on_dla
               else "the engine inspector names no DLA layer")
        summary |= {"runs_on": "gpu", "precision": plan.precision.replace(dla_tag, ""),
                    "note": f"every layer fell back to the GPU ({why}): this engine runs on the GPU only, "
                            f"not on DLA core {plan.dla_core}"}
    elif on_gpu:
        summary |= {"runs_on": "dla+gpu", "precision": plan.precision,
                    "note": f"{len(on_gpu)} of {len(placement)} layers fell back to the GPU"}
    else:
        summary |= {"runs_on": "dla", "precision": plan.precision, "note": "every layer runs on the DLA"}
    if on_dla and engine_dla is None:
        summary["note"] += " (per the builder's can_run_on_DLA; the engine inspector did not say)"
    return summary
