"""Graph passes on ONNX ``ModelProto``: Brevitas's QCDQ export -> a plain Q/DQ graph for int8 runtimes.

Brevitas writes sub-8-bit quantizers as QuantizeLinear -> Clip -> DequantizeLinear (QCDQ). Int8
runtimes (ONNX Runtime's QDQ fusions, TensorRT's explicit quantization) recognise only
Q -> DQ pairs, so ``to_qdq`` rewrites the graph without changing a single output value:

- weights: Brevitas stores them as int8 initializers followed by a Clip to the low-bit grid
  (e.g. [-7, 7] at 4 bits). The initializer is constant, so the clip is applied to it and the node
  removed (``fold_constant_clips``): the weight is an int8 tensor whose values lie on the 4-bit grid.
- activations: a Clip between Q and DQ at ``b`` < 8 bits (``requantize_activation_clips``) becomes
  Q -> DQ -> Clip(float) -> Q -> DQ with the same scale and zero point. Exact, because for integer
  bounds round(clip(v, L, H)) == clip(round(v), L, H). The producer's Q -> DQ and the consumer's
  Q -> DQ are ordinary 8-bit pairs that runtimes fuse into their int8 kernels; the float Clip
  between them is an element-wise op.

``qdq_violations`` lists what an int8 Q/DQ consumer would reject (used by export and tests).
"""

from __future__ import annotations

import numpy as np

INT_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}


# ---- small helpers -----------------------------------------------------------------------------

def _inits(model) -> dict:
    return {i.name: i for i in model.graph.initializer}


def _array(model, name: str, inits: dict | None = None):
    from onnx import numpy_helper

    inits = _inits(model) if inits is None else inits
    return numpy_helper.to_array(inits[name]) if name in inits else None


def _consumers(model) -> dict[str, list]:
    users: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _producers(model) -> dict:
    return {out: node for node in model.graph.node for out in node.output}


def _rename_input(model, old: str, new: str) -> None:
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for out in model.graph.output:
        if out.name == old:
            raise ValueError(f"cannot fold {old!r}: it is a graph output")


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _drop_unused_initializers(model) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


# ---- passes --------------------------------------------------------------------------------------

def fold_constant_clips(model) -> int:
    """Apply every Clip whose input and bounds are initializers to the initializer; remove the
    node. Returns the number of clips folded (the weights' low-bit grid becomes the stored value)."""
    from onnx import numpy_helper

    inits = _inits(model)
    folded = []
    for node in model.graph.node:
        if node.op_type != "Clip" or not node.input or node.input[0] not in inits:
            continue
        bounds = [_array(model, n, inits) if n else None for n in list(node.input[1:3])]
        if any(n and b is None for n, b in zip(node.input[1:3], bounds)):
            continue  # a bound computed at run time: not constant
        value = _array(model, node.input[0], inits)
        lo = bounds[0] if len(bounds) > 0 and bounds[0] is not None else None
        hi = bounds[1] if len(bounds) > 1 and bounds[1] is not None else None
        clipped = np.clip(value, lo, hi).astype(value.dtype)
        model.graph.initializer.append(numpy_helper.from_array(clipped, node.output[0]))
        folded.append(node)
    for node in folded:
        model.graph.node.remove(node)
    _drop_unused_initializers(model)
    return len(folded)


def _act_clip_sites(model):
    """(Q, Clip, [DQ...]) triples: a non-constant Q whose only consumer is a Clip feeding DQs."""
    users, inits = _consumers(model), _inits(model)
    for q in list(model.graph.node):
        if q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        after = users.get(q.output[0], [])
        if len(after) != 1 or after[0].op_type != "Clip":
            continue
        clip = after[0]
        dqs = users.get(clip.output[0], [])
        if dqs and all(d.op_type == "DequantizeLinear" for d in dqs):
            yield q, clip, dqs


def requantize_activation_clips(model) -> int:
    """Rewrite Q -> Clip -> DQ (a sub-8-bit activation) as Q -> DQ -> Clip(float) -> Q -> DQ.

    The float bounds are (lo - zp) * scale and (hi - zp) * scale, so the result is bit-exact.
    A clip spanning the whole 8-bit range is simply removed. Returns the number of clips rewritten.
    """
    from onnx import helper, numpy_helper

    inits, count = _inits(model), 0
    for q, clip, dqs in list(_act_clip_sites(model)):
        scale = _array(model, q.input[1], inits)
        zp = _array(model, q.input[2], inits) if len(q.input) > 2 and q.input[2] else np.array(0, np.uint8)
        lo, hi = (_array(model, n, inits) for n in clip.input[1:3])
        if scale is None or lo is None or hi is None or scale.size != 1 or zp.size != 1:
            continue  # per-channel activation or run-time bounds: leave it (qdq_violations reports it)
        qmin, qmax = INT_RANGES[zp.dtype]
        index = list(model.graph.node).index(clip)
        model.graph.node.remove(clip)
        count += 1
        if int(lo) <= qmin and int(hi) >= qmax:
            for dq in dqs:
                dq.input[0] = q.output[0]
            continue
        base = clip.output[0]
        s, z = float(scale.reshape(())), int(zp.reshape(()))
        bounds = np.array([(int(lo) - z) * s, (int(hi) - z) * s], np.float32)
        model.graph.initializer.extend([numpy_helper.from_array(bounds[0], base + "_lo_f"),
                                        numpy_helper.from_array(bounds[1], base + "_hi_f")])
        new = [helper.make_node("DequantizeLinear", [q.output[0], *q.input[1:]], [base + "_dq"], name=base + "_dq"),
               helper.make_node("Clip", [base + "_dq", base + "_lo_f", base + "_hi_f"], [base + "_f"],
                                name=base + "_clip_f"),
               helper.make_node("QuantizeLinear", [base + "_f", *q.input[1:]], [base], name=base + "_q")]
        for offset, node in enumerate(new):
            model.graph.node.insert(index + offset, node)
    _drop_unused_initializers(model)
    return count


GRID_PRESERVING = frozenset({"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"})
COMPUTE = frozenset({"Conv", "Gemm", "MatMul", "ConvTranspose"})


def requantize_before_compute(model) -> int:
    """DQ -> MaxPool -> Conv (Brevitas passes a quantized tensor through max-pooling and reshapes
    without a quantizer) becomes DQ -> MaxPool -> Q -> DQ -> Conv with the DQ's own scale and zero
    point. Exact: these ops only select or move values, so their outputs lie on the same grid;
    the runtime then sees a Q/DQ-wrapped convolution it can fuse. Returns the number inserted."""
    from onnx import helper

    producers, users, count = _producers(model), _consumers(model), 0
    for node in list(model.graph.node):
        if node.op_type not in GRID_PRESERVING or not node.input:
            continue
        dq = producers.get(node.input[0])
        after = users.get(node.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or not any(u.op_type in COMPUTE for u in after):
            continue
        out = node.output[0]
        new_out = out + "_grid"
        node.output[0] = new_out
        index = list(model.graph.node).index(node) + 1
        model.graph.node.insert(index, helper.make_node("QuantizeLinear", [new_out, *dq.input[1:]], [out + "_q"],
                                                        name=out + "_requant_q"))
        model.graph.node.insert(index + 1, helper.make_node("DequantizeLinear", [out + "_q", *dq.input[1:]], [out],
                                                            name=out + "_requant_dq"))
        count += 1
    return count


def activations_to_uint8(model) -> int:
    """Store signed int8 activations as uint8: q + 128 with zero point zp + 128 is the same real
    value. For runtimes whose int8 kernels are u8 x s8 (ONNX Runtime on x86 and ARM): a
    convolution with int8 activations on either side stays in float on x86 without VNNI, and ORT's
    own int8 -> uint8 rewrite misses Q nodes whose DQ is shared (residual branches). Not for
    TensorRT, which wants int8 with zero point 0. Returns the number of Q nodes changed."""
    from onnx import numpy_helper

    inits, users = _inits(model), _consumers(model)
    acts = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits
            and len(n.input) > 2 and n.input[2] in inits]
    zps = {n.name or n.output[0]: _array(model, n.input[2], inits) for n in acts}
    count = 0
    for q in acts:
        zp = zps[q.name or q.output[0]]
        after = users.get(q.output[0], [])
        if zp.dtype != np.int8 or zp.size != 1 or not after or any(u.op_type != "DequantizeLinear" for u in after):
            continue
        name = q.output[0] + "_zp_u8"
        model.graph.initializer.append(numpy_helper.from_array((zp.astype(np.int16) + 128).astype(np.uint8), name))
        for node in (q, *after):
            node.input[2] = name
        count += 1
    _drop_unused_initializers(model)
    return count


def to_qdq(model, uint8_activations: bool = False):
    """QCDQ ModelProto -> Q/DQ ModelProto (in place, also returned); see the module docstring.
    ``uint8_activations``: store every activation as uint8 (``activations_to_uint8``)."""
    fold_constant_clips(model)
    requantize_activation_clips(model)
    requantize_before_compute(model)
    if uint8_activations:
        activations_to_uint8(model)
    return model


# ---- structure checks --------------------------------------------------------------------------

def weight_dequantizers(model):
    """DequantizeLinear nodes whose quantized input is a constant (weights and biases)."""
    inits = _inits(model)
    return [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]


def qdq_violations(model, min_opset: int = 13) -> list[str]:
    """What makes ``model`` something other than a plain int8 Q/DQ graph, one line each:
    a Clip (or anything) between Q and DQ, weights not int8 or with a nonzero zero point,
    per-channel scales on an axis other than 0 (output channels), or an opset below ``min_opset``."""
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < min_opset:
        problems.append(f"opset {opset} < {min_opset}")
    producers, inits = _producers(model), _inits(model)
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] in inits:
            continue
        src = producers.get(node.input[0])
        if src is None or src.op_type != "QuantizeLinear":
            problems.append(f"{node.name or node.output[0]}: input comes from "
                            f"{src.op_type if src is not None else 'a graph input'}, not QuantizeLinear")
    for node in weight_dequantizers(model):
        value = _array(model, node.input[0], inits)
        if value.dtype == np.int32:
            continue  # int32 bias on input_scale * weight_scale
        where = node.name or node.output[0]
        if value.dtype != np.int8:
            problems.append(f"{where}: weight stored as {value.dtype}, not int8")
        zp = _array(model, node.input[2], inits) if len(node.input) > 2 and node.input[2] else None
        if zp is not None and np.any(zp != 0):
            problems.append(f"{where}: weight zero point is not 0")
        scale = _array(model, node.input[1], inits)
        if scale is not None and scale.size > 1 and _attr(node, "axis", 1) != 0:
            problems.append(f"{where}: per-channel scale on axis {_attr(node, 'axis', 1)}, not 0")
    return problems


def activation_bits(model) -> list[int]:
    """Number of levels of each activation quantizer, as bits (8 for a plain Q/DQ pair)."""
    inits, out = _inits(model), []
    for q, clip, _ in _act_clip_sites(model):
        lo, hi = (_array(model, n, inits) for n in clip.input[1:3])
        out.append(int(np.ceil(np.log2(int(hi) - int(lo) + 1))))
    return out
