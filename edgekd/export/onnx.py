"""Export a distilled student to the form a target runs, and prove it matches PyTorch.

Flavours (``FLAVOURS``; a target's ``flavour`` picks one):
- ``qdq``: plain QuantizeLinear/DequantizeLinear pairs for int8 runtimes (ONNX Runtime, TensorRT):
  symmetric int8 weights (zero point 0) on their low-bit grid, per output channel (axis 0), no Clip
  between Q and DQ (``onnx_passes.to_qdq`` rewrites Brevitas's QCDQ graph exactly).
- ``qcdq``: Brevitas's QuantizeLinear/Clip/DequantizeLinear graph as exported.
- ``qonnx``: true low-bit ``Quant`` nodes, for FINN/hls4ml.
- ``fp32``: a float model as plain ONNX (``export --float``: the reference for speed and accuracy).
Which flavours a runtime takes is the backend's to say (``Backend.flavours``); running the
artifact and comparing it with PyTorch (parity) is the deploy stage's, through the backend.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..core.errors import EdgekdError, MissingExtraError

FLAVOURS = ("qdq", "qcdq", "qonnx", "fp32")


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
        elif flavour == "fp32":  # the float model as it is: the reference a quantized bundle is timed against
            torch.onnx.export(model, (example,), str(path), opset_version=opset, dynamo=False,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
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

    from . import passes

    model = passes.to_qdq(onnx.load(str(path)), uint8_activations=uint8_activations)
    problems = passes.qdq_violations(model, min_opset=13)
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
