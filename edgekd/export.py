"""Export a distilled student to the form a target runs, and prove it matches PyTorch.

Flavours (``FLAVOURS``; a target's ``flavour`` picks one):
- ``qdq``: plain QuantizeLinear/DequantizeLinear pairs for int8 runtimes (ONNX Runtime, TensorRT):
  symmetric int8 weights (zero point 0) on their low-bit grid, per output channel (axis 0), no Clip
  between Q and DQ (``onnx_passes.to_qdq`` rewrites Brevitas's QCDQ graph exactly).
- ``qcdq``: Brevitas's QuantizeLinear/Clip/DequantizeLinear graph as exported.
- ``qonnx``: true low-bit ``Quant`` nodes, for FINN/hls4ml.
Every artifact is run on the preprocessed test split and compared with the PyTorch model:
top-1 agreement and the largest absolute logit difference go into the manifest, and an
agreement below the target's tolerance is an error (nothing is written).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .fsutil import sha256_file
from .errors import EdgekdError, MissingExtraError, ParityError

FLAVOURS = ("qdq", "qcdq", "qonnx")


def export_onnx(model: torch.nn.Module, flavour: str, example: torch.Tensor, path: Path, opset: int) -> None:
    """Write ``model`` as ONNX in ``flavour`` (TorchScript-based exporter: see DESIGN.md section 4)."""
    if flavour not in FLAVOURS:
        raise EdgekdError(f"unknown export flavour {flavour!r}", f"choose one of: {', '.join(FLAVOURS)}")
    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if flavour in ("qcdq", "qdq"):
            from brevitas.export import export_onnx_qcdq

            export_onnx_qcdq(model, args=example, export_path=str(path), opset_version=opset, dynamo=False,
                             input_names=["input"], output_names=["logits"],
                             dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            if flavour == "qdq":
                _to_qdq(path, uint8_activations=_unsigned_convention(model))
        elif flavour == "qonnx":
            from brevitas.export import export_qonnx

            export_qonnx(model, args=example, export_path=str(path), opset_version=opset, dynamo=False,
                         input_names=["input"], output_names=["logits"])
            _qonnx_cleanup(path)


def _unsigned_convention(model) -> bool:
    """Whether ``model`` was quantized for a u8 x s8 runtime (unsigned activations after ReLU,
    quant.QuantSpec.act_after_relu): then every activation is exported as uint8. The TensorRT
    convention (signed) keeps int8 activations with zero point 0."""
    spec = getattr(model, "edgekd_spec", None)
    return spec is None or spec.act_after_relu == "unsigned"


def _to_qdq(path: Path, uint8_activations: bool) -> None:
    """Rewrite the QCDQ file at ``path`` into plain Q/DQ; refuse to write a graph that is not."""
    import onnx

    from . import onnx_passes

    model = onnx_passes.to_qdq(onnx.load(str(path)), uint8_activations=uint8_activations)
    problems = onnx_passes.qdq_violations(model, min_opset=13)
    if problems:
        raise EdgekdError(f"the qdq export is not a plain Q/DQ graph: {'; '.join(problems[:5])}"
                          + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""),
                          "use a target with flavour qcdq, or report the model")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _qonnx_cleanup(path: Path) -> None:
    try:
        from qonnx.util.cleanup import cleanup
    except ImportError:
        raise MissingExtraError("qonnx", "qonnx", "the FPGA (QONNX) export") from None
    cleanup(str(path), out_file=str(path))


def run_artifact(backend: str, model_path: Path, x: np.ndarray, threads: int = 0, batch: int = 256) -> np.ndarray:
    """Logits of the exported artifact on ``x``, through the target's own runtime.

    - ``onnxruntime``: the bundle's session (the device's settings: level "all", session config
      entries stored in the model, see backends.onnxruntime.session_config).
    - ``qonnx``: qonnx's executor (backends.qonnx.run), in fixed batches.
    - ``tensorrt``: a built engine (``.engine``) through TensorRT; before the engine exists (on a
      host without TensorRT) the Q/DQ ONNX graph through ONNX Runtime without fusions (level
      "basic": DequantizeLinear -> float Conv -> QuantizeLinear), the reference semantics of the
      same graph TensorRT parses.
    """
    if backend == "qonnx":
        return _run_qonnx(model_path, x)
    if backend == "tensorrt" and Path(model_path).suffix == ".engine":
        from .backends import get_runner

        runner = get_runner("tensorrt")
        handle = runner.load(Path(model_path))
        return np.concatenate([runner.run(handle, x[i: i + batch]) for i in range(0, len(x), batch)])
    if backend in ("onnxruntime", "tensorrt"):
        from .backends import onnxruntime as ortb

        level = "all" if backend == "onnxruntime" else "basic"
        session = ortb.make_session(model_path, threads=threads, level=level)
        name = session.get_inputs()[0].name
        return np.concatenate([session.run(None, {name: x[i: i + batch]})[0] for i in range(0, len(x), batch)])
    raise EdgekdError(f"backend {backend!r} cannot run on this machine")


def _run_qonnx(model_path: Path, x: np.ndarray) -> np.ndarray:
    from .backends import qonnx as qb

    return qb.run(model_path, x)


def parity(reference: np.ndarray, runtime: np.ndarray, labels: np.ndarray) -> dict:
    """Agreement of the runtime's logits with PyTorch's on the same samples."""
    agree = reference.argmax(1) == runtime.argmax(1)
    return {"n": int(len(labels)), "top1_agreement": float(agree.mean()),
            "max_abs_diff": float(np.abs(reference - runtime).max()),
            "mean_abs_diff": float(np.abs(reference - runtime).mean()),
            "runtime_accuracy": float((runtime.argmax(1) == labels).mean()),
            "torch_accuracy": float((reference.argmax(1) == labels).mean()),
            "disagreements": int((~agree).sum())}


def check_parity(report: dict, tolerance, where: str) -> None:
    """Raise one ParityError listing every bound the artifact misses."""
    misses = []
    if report["top1_agreement"] < tolerance.min_top1_agreement:
        misses.append(f"top-1 agreement {report['top1_agreement']:.4f} < {tolerance.min_top1_agreement}")
    if tolerance.max_abs_diff is not None and report["max_abs_diff"] > tolerance.max_abs_diff:
        misses.append(f"max abs diff {report['max_abs_diff']:.3g} > {tolerance.max_abs_diff}")
    if misses:
        raise ParityError(f"{where} does not match the PyTorch model on {report['n']} test samples: "
                          + "; ".join(misses), "retrain with the "
                          "target's conventions (distill --target)")


def file_hashes(directory: Path, skip=("manifest.json",)) -> dict:
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name not in skip}


def manifest_base(target, run_meta: dict, metrics: dict) -> dict:
    spec = run_meta["quant"]
    return {"name": "", "target": target.name, "backend": target.backend, "format": target.flavour,
            "opset": target.opset, "weight_bits": spec["weight_bits"], "act_bits": spec["act_bits"],
            "quant": spec, "student": run_meta["arch"], "dataset": run_meta["dataset"],
            "input_shape": list(run_meta["input_shape"]), "input_name": "input", "classes": run_meta["classes"],
            "normalization": run_meta["normalization"], "torch_accuracy": None,
            "teacher_accuracy": metrics.get("teacher_accuracy"),
            "student_float_accuracy": metrics.get("student_float_accuracy"),
            "distill_student_accuracy": metrics.get("student_accuracy"), "edgekd_version": __version__}
