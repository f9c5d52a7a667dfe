"""Export a distilled student to the form a target runs, and prove it matches PyTorch.

Flavours: ``qcdq`` (Brevitas's QuantizeLinear/Clip/DequantizeLinear graph, which ONNX Runtime
fuses into QLinear kernels at 8 bits), ``qonnx`` (true low-bit ``Quant`` nodes, for FINN/hls4ml).
Every artifact is run on the preprocessed test split and compared with the PyTorch model:
top-1 agreement and the largest absolute logit difference go into the manifest, and an
agreement below the target's tolerance is an error (nothing is written).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import EdgekdError, MissingExtraError, ParityError


def export_onnx(model: torch.nn.Module, flavour: str, example: torch.Tensor, path: Path, opset: int) -> None:
    """Write ``model`` as ONNX in ``flavour`` (TorchScript-based exporter: see DESIGN.md section 4)."""
    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if flavour == "qcdq":
            from brevitas.export import export_onnx_qcdq

            export_onnx_qcdq(model, args=example, export_path=str(path), opset_version=opset, dynamo=False,
                             input_names=["input"], output_names=["logits"],
                             dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        elif flavour == "qonnx":
            from brevitas.export import export_qonnx

            export_qonnx(model, args=example, export_path=str(path), opset_version=opset, dynamo=False,
                         input_names=["input"], output_names=["logits"])
            _qonnx_cleanup(path)
        else:
            raise EdgekdError(f"export flavour {flavour!r} is not available yet", "use a target with flavour qcdq or qonnx")


def _qonnx_cleanup(path: Path) -> None:
    try:
        from qonnx.util.cleanup import cleanup
    except ImportError:
        raise MissingExtraError("qonnx", "qonnx", "the FPGA (QONNX) export") from None
    cleanup(str(path), out_file=str(path))


def run_artifact(backend: str, model_path: Path, x: np.ndarray, threads: int = 0, batch: int = 256) -> np.ndarray:
    """Logits of the exported artifact on ``x``, through the target's own runtime."""
    if backend == "onnxruntime":
        from .backends import onnxruntime as ortb

        session = ortb.make_session(model_path, threads=threads)
        name = session.get_inputs()[0].name
        return np.concatenate([session.run(None, {name: x[i: i + batch]})[0] for i in range(0, len(x), batch)])
    if backend == "qonnx":
        return _run_qonnx(model_path, x)
    raise EdgekdError(f"backend {backend!r} cannot run on this machine")


def _run_qonnx(model_path: Path, x: np.ndarray) -> np.ndarray:
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    model = ModelWrapper(str(model_path))
    iname, oname = model.graph.input[0].name, model.graph.output[0].name
    return np.concatenate([execute_onnx(model, {iname: x[i: i + 1]})[oname] for i in range(len(x))])


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


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(directory: Path, skip=("manifest.json",)) -> dict:
    return {p.name: sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name not in skip}


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
