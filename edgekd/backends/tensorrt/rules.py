"""TensorRT's rules for explicit quantization, on the ONNX graph alone and on a run's quantizer
conventions (pure: needs only onnx)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np



# --- TensorRT's rules for explicit quantization, on the ONNX graph (pure: needs only onnx) -------------
#
# From the ONNX parser's Q/DQ importer (onnx/onnx-tensorrt, QuantDequantLinearHelper in
# builtin_op_importers.cpp on 8.5-GA and onnxOpImporters.cpp on 10.0-GA) and its operator table
# (docs/operators.md: DequantizeLinear takes INT8 (8.5; 10.x adds FP8/INT4), "x_zero_point must be
# zero"; QuantizeLinear "y_zero_point must be 0"):
# - UINT8 inputs are refused (notInvalidType(inputs.at(0), {"UINT8"})), and so is a UINT8 zero point
#   on QuantizeLinear in 8.5 (10.x warns and quantizes to INT8 instead, which changes the values);
# - 8.5 requires 3 inputs ("This version of TensorRT requires 3 inputs for the DequantizeLinear
#   operator"); 10.x accepts 2 (then INT8), but bundles must build on JetPack 5 too;
# - zero points all 0 ("TRT only supports symmetric quantization - zeroPt must be all zeros");
# - scales all positive ("Scale coefficients must all be positive");
# - a per-channel scale is taken as weight quantization ("We assume this is weight-quantization with
#   dimensions KCRS (K is # output channels). Activations-quantization does not support per-axis
#   quantization"), and without an axis attribute the parser uses axis 0 where ONNX means axis 1.
# Output channels of the consuming op's weight (ONNX operator layouts): Conv W is (M, C/g, kH, kW):
# axis 0; ConvTranspose W is (C, M/g, kH, kW): axis 1; Gemm B is (N, K) with transB=1: axis 0, else
# (K, N): axis 1; MatMul B is (..., K, N): its last axis.

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _constants(model) -> dict:
    """Name -> numpy value of every initializer and Constant node output."""
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
    return values


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _weight_axis(consumer, index: int, rank: int) -> int | None:
    """The output-channel axis of input ``index`` of ``consumer`` when it is a weight, else None."""
    op = consumer.op_type
    if op == "Conv" and index == 1:
        return 0
    if op == "ConvTranspose" and index == 1:
        return 1
    if op == "Gemm" and index == 1:
        return 0 if _attr(consumer, "transB", 0) else 1
    if op == "MatMul" and index == 1:
        return rank - 1
    return None


def check_qdq_rules(onnx_model) -> list[str]:
    """What in ``onnx_model`` (a ModelProto, or a path to one) TensorRT's ONNX parser refuses or
    reads differently from ONNX for explicit quantization, one line each (empty: none):
    Q/DQ int8 only (no uint8), zero points all 0, no int32 DequantizeLinear input (an int32 bias
    must stay float), three inputs on every Q/DQ (scale and zero point given), scales positive,
    per-channel scales only on constant weights, on the consuming op's output-channel axis."""
    import onnx

    model = onnx.load(str(onnx_model)) if isinstance(onnx_model, (str, Path)) else onnx_model
    consts = _constants(model)
    users: dict[str, list[tuple[Any, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            users.setdefault(name, []).append((node, i))
    problems = []
    for node in model.graph.node:
        if node.op_type in QDQ_OPS:
            problems += _node_problems(node, consts, users)
    return problems


def _node_problems(node, consts: dict, users: dict) -> list[str]:
    """TensorRT's rules for one QuantizeLinear / DequantizeLinear node."""
    problems = []
    where = f"{node.op_type} {node.name or node.output[0]}"
    inputs = list(node.input) + [""] * (3 - len(node.input))
    if len(node.input) < 3 or not all(inputs[:3]):
        problems.append(f"{where}: {len([n for n in node.input if n])} inputs; TensorRT 8.5's parser requires 3 "
                        "(scale and an int8 zero point; without one ONNX means uint8)")
    data = consts.get(inputs[0])
    scale = consts.get(inputs[1])
    zp = consts.get(inputs[2]) if inputs[2] else None
    if node.op_type == "DequantizeLinear" and data is not None:
        if data.dtype == np.int32:
            problems.append(f"{where}: int32 input (an int32 bias); TensorRT's parser dequantizes int8 only: "
                            "keep the bias float (QuantSpec bias='float')")
            return problems
        if data.dtype != np.int8:
            problems.append(f"{where}: {data.dtype} input; TensorRT's parser dequantizes int8 only")
    if zp is not None:
        if zp.dtype == np.uint8:
            problems.append(f"{where}: uint8 zero point (uint8 quantization); TensorRT takes int8 only "
                            "(QuantSpec act_after_relu='signed')")
        elif zp.dtype != np.int8:
            problems.append(f"{where}: {zp.dtype} zero point; TensorRT takes int8 only")
        if np.any(zp != 0):
            nz = sorted({int(v) for v in np.unique(zp) if v != 0})[:3]
            problems.append(f"{where}: zero point {nz[0] if len(nz) == 1 else nz}, not 0; TensorRT supports "
                            "symmetric quantization only")
    elif inputs[2]:
        problems.append(f"{where}: zero point {inputs[2]!r} is computed at run time; TensorRT needs a constant 0")
    if scale is None:
        problems.append(f"{where}: scale {inputs[1]!r} is not a constant")
        return problems
    if not np.all(scale > 0):
        problems.append(f"{where}: scales must all be positive")
    return _axis_problems(node, where, data, scale, users, problems)


def _axis_problems(node, where: str, data, scale, users: dict, problems: list[str]) -> list[str]:
    """Per-channel scales: only on constant weights, on the output-channel axis of the op that uses them."""
    if scale.size == 1:
        return problems
    if data is None:
        problems.append(f"{where}: per-channel scale ({scale.size}) on a tensor computed at run time; TensorRT "
                        "quantizes activations per tensor only")
        return problems
    axis = _attr(node, "axis")
    if axis is None:
        problems.append(f"{where}: per-channel scale without an axis attribute (ONNX means axis 1, TensorRT's "
                        "parser reads axis 0): write the axis")
        return problems
    axis = axis + data.ndim if axis < 0 else axis
    if node.op_type == "QuantizeLinear":  # constant float weight -> Q -> DQ -> op: the DQ is checked
        return problems
    sites = users.get(node.output[0], [])
    wanted = {(c.op_type, _weight_axis(c, i, data.ndim)) for c, i in sites}
    if not sites or any(w is None for _, w in wanted):
        ops = ", ".join(sorted({c.op_type for c, _ in sites})) or "nothing"
        problems.append(f"{where}: per-channel scale on a constant that feeds {ops}, not the weight input of a "
                        "Conv, ConvTranspose, Gemm or MatMul")
        return problems
    for op, want in sorted(wanted):
        if axis != want:
            problems.append(f"{where}: per-channel scale on axis {axis}; the output channels of {op}'s weight "
                            f"are axis {want}")
    return problems


# The quantizer conventions TensorRT needs of a run (edgekd.quant QuantSpec fields; targets/tensorrt-int8.toml).
TRT_CONVENTIONS = {"act_after_relu": "signed", "bias": "float"}


def check_run_conventions(quant: dict) -> str | None:
    """Why a run quantized with ``quant`` (a QuantSpec dict: act_after_relu, bias, ...) cannot be
    exported for TensorRT, or None when it can. A missing key means QuantSpec's default
    (act_after_relu "unsigned", bias "int32"), which is what the run was built with."""
    reasons = []
    act = quant.get("act_after_relu", "unsigned")
    if act != TRT_CONVENTIONS["act_after_relu"]:
        reasons.append(f"its activations after ReLU are {act} (exported as uint8 with zero point 128), and TensorRT's "
                       "ONNX parser takes int8 with zero point 0 only")
    bias = quant.get("bias", "int32")
    if bias != TRT_CONVENTIONS["bias"]:
        reasons.append(f"its bias is quantized to {bias} (an {bias} DequantizeLinear input), and TensorRT's parser "
                       "dequantizes int8 only and adds a float bias itself")
    if not reasons:
        return None
    return ("the run was quantized for another runtime's conventions: " + "; ".join(reasons)
            + " (TensorRT needs " + ", ".join(f"{k}={v!r}" for k, v in TRT_CONVENTIONS.items()) + ")")
