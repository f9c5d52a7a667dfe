"""The TensorRT backend: build an int8 engine from a bundle's Q/DQ ONNX graph, on the device,
and run it; plus the rules TensorRT's ONNX parser sets for explicit quantization, checked on the
ONNX graph alone (``check_qdq_rules``) and on a run's quantizer conventions
(``check_run_conventions``) before anything is exported for TensorRT.

UNVERIFIED ON A GPU: written against NVIDIA's Python bindings as published in NVIDIA/TensorRT
(``python/src/infer/pyCore.cpp`` and ``include/NvInfer.h`` on the release/8.5, release/10.3,
release/10.12 and release/11.0 branches), the ONNX parser's Q/DQ importer (onnx/onnx-tensorrt,
``QuantDequantLinearHelper`` on 8.5-GA and 10.0-GA) and cuda-python's runtime bindings. It has not
been run on a Jetson or any GPU. The pure functions (``build_plan``, ``timing_cache_name``,
``layer_precisions``, ``dla_summary``, ``check_qdq_rules``, ``check_run_conventions``) are tested
everywhere; ``build_engine`` and the runner are driven through a fake ``tensorrt`` module in
tests/test_tensorrt.py (the calls made, not what TensorRT does with them) and run for real only
where ``tensorrt`` imports and a CUDA GPU is present (``pytest -m tensorrt``).

Engines are specific to the GPU and the TensorRT version, so they are built where they run:
``edgekd export --target jetson`` on a workstation writes the bundle (ONNX checked with ONNX
Runtime) and the command to run on the Jetson, ``edgekd compile BUNDLE``, which calls
``build_engine`` here.

Version branches (``build_plan``; flags by name, values read from the installed bindings):
- TensorRT < 10 (8.5 on Xavier / JetPack 5.1, 8.6): the network is created with
  ``1 << NetworkDefinitionCreationFlag.EXPLICIT_BATCH``: the 8.x ONNX parser supports explicit
  batch networks only. Weakly typed: the Q/DQ layers are honoured with ``BuilderFlag.INT8``;
  ``BuilderFlag.FP16`` lets the layers outside Q/DQ pairs run in FP16 (target option ``fp16``).
- 10.0 <= TensorRT < 10.12 (JetPack 6.x ships 10.3): networks are always explicit batch
  (EXPLICIT_BATCH is deprecated and ignored, so no flag is passed); weakly typed as above.
- 10.12 <= TensorRT < 11: weak typing is deprecated (BuilderFlag INT8/FP16 are deprecated enums
  in 10.12's NvInfer.h): the network is created STRONGLY_TYPED; the Q/DQ nodes alone decide
  int8, no precision flags are set, float layers keep the ONNX types (FP32: ``fp16`` is ignored,
  with a note).
- TensorRT >= 11: always strongly typed (``STRONGLY_TYPED`` is deprecated and ignored, the INT8
  and FP16 builder flags no longer exist). Same plan as above, without any creation flag.

Optimization profile (one, on the batch dimension): min = the smallest bench batch size, opt = the
most common one (batch 1 when benched, else the profile's first batch size), max = the largest.
DLA needs a static shape (TensorRT Developer Guide, "DLA Supported Layers and Restrictions": the
profile's min, max and opt must be equal, and the runtime dimensions must be the ones built), so a
DLA engine is built for ONE batch size, the opt batch: min = opt = max. (The alternative, one
profile per bench batch size, is not taken on purpose: each profile is a separate DLA loadable
and a core holds at most 16, which GPU fallback splits can exhaust; the runner would also have to
switch profiles between batch sizes.) Bench rows at other batch sizes are refused with the
engine's batch named (``EngineHandle.prepare``); ``TensorrtRunner.run`` pads to it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...core.errors import EdgekdError
from .. import Backend, Compiled, ExportContext, Option
from .build import build_engine, dla_placement  # noqa: F401
from .plan import (ENGINE_FILE, EXTRA_HINT, LAYERS_FILE, BuildPlan, batch_profile, build_plan,  # noqa: F401
                   dla_summary, engine_dla_layers, import_cudart, import_tensorrt, layer_precisions,
                   timing_cache_name, version_tuple)
from .rules import check_qdq_rules, check_run_conventions  # noqa: F401
from .runner import RUNNER, EngineHandle, TensorrtRunner  # noqa: F401


# --- the backend (export on a workstation, engine built on the device) ---------------------------

def compile_command(bundle_name: str, profile: str | None = None) -> str:
    return f"edgekd compile {bundle_name}" + (f" --profile {profile}" if profile else "")


class TensorrtBackend(Backend):
    """TensorRT engines from the bundle's Q/DQ ONNX graph. Engines are specific to the GPU and the
    TensorRT version, so they are built where they run: at export the bundle gets the graph,
    validated with ONNX Runtime without fusions (the reference semantics of the graph TensorRT
    parses), the PyTorch logits and the command to run on the device, ``edgekd compile``."""

    name = "tensorrt"
    title = "TensorRT"
    builds_on_device = True
    device_files = (ENGINE_FILE, LAYERS_FILE)  # and the timing cache (timing_cache_name)
    flavours = ("qdq", "qcdq")
    package, extra, purpose = "tensorrt", "tensorrt", "building or running a TensorRT engine"
    options = {
        "workspace_mb": Option(int, "builder workspace memory pool limit (MemoryPoolType.WORKSPACE)", lo=1,
                               hi=1 << 24),  # 16 TiB: its bytes still fit TensorRT's int64
        "builder_optimization_level": Option(int, "IBuilderConfig.builder_optimization_level (TensorRT >= 8.6)",
                                             lo=0, hi=5),
        "timing_cache": Option(str, "timing cache file name next to the engine; '' disables it", file_name=True),
        "dla_core": Option(int, "DLA core to build for; -1: GPU only", lo=-1, hi=1),
        "gpu_fallback": Option(bool, "let layers the DLA cannot run fall back to the GPU"),
        "fp16": Option(bool, "layers outside Q/DQ pairs may run in FP16 instead of FP32"),
        "engine_build": Option(str, "where the engine is built; engines do not move between GPUs or versions",
                               ("device", "export")),
    }

    def runner(self) -> TensorrtRunner:
        return RUNNER  # tensorrt itself is imported when an engine is loaded

    def infer(self, artifact: Path, x: np.ndarray, options: dict | None = None) -> np.ndarray:
        if Path(artifact).suffix == ".engine":
            return super().infer(artifact, x, options)
        from ...bundle import batched_logits
        from ..onnxruntime import OrtRunner

        runner = OrtRunner(level="basic")  # Q/DQ -> float Conv -> Q: what the parser reads, unfused
        handle = runner.load(artifact, 0)
        return batched_logits(runner, handle, x, 256, False)

    def check_run(self, quant: dict, target) -> str | None:
        return check_run_conventions(quant)

    def compile(self, onnx_path: Path, ctx: ExportContext) -> Compiled:
        problems = check_qdq_rules(onnx_path)
        if problems:
            raise EdgekdError(f"the ONNX graph breaks TensorRT's explicit-quantization rules: {'; '.join(problems[:5])}"
                              + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""),
                              "distill the run with the target's conventions (act_after_relu = 'signed', "
                              "bias = 'float')")
        ctx.log(f"target {ctx.target.name}: the TensorRT engine is built on the device, not here; "
                "the ONNX graph is validated with ONNX Runtime as the reference runtime")
        return Compiled(onnx_path)

    def manifest_extras(self, ctx: ExportContext) -> dict:
        np.save(ctx.bundle / "reference_logits.npy", ctx.reference.astype(np.float32))
        command = compile_command(ctx.name)
        ctx.log(f"warning: not compiled: the TensorRT engine is built on the device; copy the bundle to the Jetson "
                f"and run `{command}` there (TensorRT comes with JetPack)")
        return {"compiled": False, "compile_command": command, "reference_file": "reference_logits.npy",
                "parity_runtime": "onnxruntime (level basic: Q/DQ graph without fusions, the reference for the "
                                  "graph TensorRT parses)"}

    def compile_on_device(self, bundle: Path, manifest: dict, profile, log) -> dict:
        """Build the engine here, check it against the PyTorch logits saved at export; returns the
        manifest fields to update (compiled: true, model_file: model.engine)."""
        from ...bundle import load_eval, parity

        import_tensorrt()
        options = manifest.get("backend_options", {})
        dla_cores, batch_sizes = None, (1, 64)
        if profile is not None:  # the profile's order: its first batch size is the opt batch when 1 is not benched
            dla_cores = (profile.hardware.get("accelerator") or {}).get("dla_cores", 0)
            batch_sizes = tuple(profile.bench.batch_sizes)
        build = build_engine(bundle / "model.onnx", bundle, options, dla_cores, batch_sizes, log)
        x, y = load_eval(bundle, manifest)
        logits = super().infer(bundle / ENGINE_FILE, x, options)  # options: the runtime's DLA core
        reference = np.load(bundle / manifest.get("reference_file", "reference_logits.npy"), allow_pickle=False)
        report = parity(reference, logits, y)
        return {"model_file": ENGINE_FILE, "compiled": True, "engine": build, "engine_parity": report,
                "runtime_accuracy": report["runtime_accuracy"]}


BACKEND = TensorrtBackend()
