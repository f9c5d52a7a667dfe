"""Read a quantized layer's output out of an exported ONNX graph, as the runtime computes it.

A layer of the student is a ``Conv`` / ``Gemm`` / ``MatMul`` of the graph (matched in graph order,
their weight shapes checked against the student's); its *tap* is the quantized tensor its output
becomes: the integer tensor that the ``DequantizeLinear`` after its requantization reads (qdq and
qcdq flavours), or the ``Quant`` node's output (qonnx). Integer tensors survive ONNX Runtime's
fusions (a fused ``QLinearConv`` writes the very tensor its ``QuantizeLinear`` wrote), so making them
extra graph outputs of an in-memory copy changes neither the fusion nor the values. This module only
reads graphs (taps, their integer levels); running one is its backend's ``Backend.run_tapped``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
PASS_OPS = ("Relu", "Identity")  # between a layer and its output quantizer (QuantReLU exports Relu -> Q)


@dataclass(frozen=True)
class Tap:
    tensor: str  # the graph tensor holding the layer's quantized output
    scale: str | None = None  # initializers dequantizing it (None: already real-valued, QONNX Quant)
    zero_point: str | None = None


def _index(model):
    producers = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    inits = {i.name: i for i in model.graph.initializer}
    return producers, users, inits


def _weight_shape(node, producers, inits) -> tuple | None:
    """The shape of a compute node's constant weight (through DequantizeLinear / Quant / Clip)."""
    name = node.input[1] if len(node.input) > 1 else None
    for _ in range(4):
        if name in inits:
            return tuple(inits[name].dims)
        src = producers.get(name)
        if src is None or src.op_type not in ("DequantizeLinear", "Quant", "Clip", "Transpose"):
            return None
        name = src.input[0]
    return None


def _only_user(users, tensor: str, ops) -> object | None:
    after = users.get(tensor, [])
    return after[0] if len(after) == 1 and after[0].op_type in ops else None


def _tap(node, users) -> Tap | None:
    """The quantized form of compute ``node``'s output, or None (no quantizer right after it)."""
    out = node.output[0]
    for _ in range(3):
        step = _only_user(users, out, PASS_OPS)
        if step is None:
            break
        out = step.output[0]
    q = _only_user(users, out, ("QuantizeLinear", "Quant"))
    if q is None:
        return None
    if q.op_type == "Quant":
        return Tap(q.output[0])
    tensor = q.output[0]
    # qdq flavour below 8 bits: Q -> DQ -> Clip (float) -> Q' -> DQ; the tap is what the last DQ reads
    dq = _only_user(users, tensor, ("DequantizeLinear",))
    clip = _only_user(users, dq.output[0], ("Clip",)) if dq is not None else None
    requant = _only_user(users, clip.output[0], ("QuantizeLinear",)) if clip is not None else None
    if requant is not None:
        tensor = requant.output[0]
    dq = next((u for u in users.get(tensor, []) if u.op_type == "DequantizeLinear"), None)
    if dq is None:
        return None
    return Tap(tensor, dq.input[1], dq.input[2] if len(dq.input) > 2 and dq.input[2] else None)


def taps(model, layers: list[tuple[str, tuple]]) -> dict[str, Tap]:
    """Layer name -> its Tap in ONNX ``model``. ``layers``: (name, weight shape) of every call of a
    compute layer, in the order the student runs them. Raises ValueError when the graph's compute
    nodes do not line up with them (count or weight shapes)."""
    producers, users, inits = _index(model)
    nodes = [n for n in model.graph.node if n.op_type in COMPUTE_OPS and _weight_shape(n, producers, inits)]
    if len(nodes) != len(layers):
        raise ValueError(f"the graph has {len(nodes)} compute nodes with constant weights, the student "
                         f"{len(layers)} layer calls")
    out = {}
    for (name, shape), node in zip(layers, nodes):
        found = _weight_shape(node, producers, inits)
        if found != tuple(shape) and found != tuple(reversed(shape)):
            raise ValueError(f"layer {name}: weight shape {tuple(shape)} in PyTorch, {found} in the graph "
                             f"({node.name or node.op_type})")
        tap = _tap(node, users)
        if tap is not None and name not in out:
            out[name] = tap
    return out


def _array(inits, name):
    from onnx import numpy_helper

    return numpy_helper.to_array(inits[name]).astype(np.float64)


def real_values(model, tap: Tap, raw: np.ndarray) -> np.ndarray:
    """The tensor ``raw`` a runtime computed for ``tap`` as real numbers: dequantized with the tap's
    scale and zero point (a tap without them, e.g. a QONNX ``Quant`` output, is real-valued already)."""
    v = np.asarray(raw).astype(np.float64)
    if tap.scale is None:
        return v
    _, _, inits = _index(model)
    zp = _array(inits, tap.zero_point) if tap.zero_point else 0.0
    return (v - zp) * _array(inits, tap.scale)


def levels(model, tap: Tap, values: np.ndarray) -> np.ndarray | None:
    """``values`` (real numbers) as integer levels of ``tap``'s grid (None: a tap without one), so
    that a PyTorch value and the runtime's compare exactly, without float rounding noise."""
    if tap.scale is None:
        return None
    _, _, inits = _index(model)
    zp = _array(inits, tap.zero_point) if tap.zero_point else 0.0
    return np.rint(np.asarray(values, np.float64) / _array(inits, tap.scale) + zp) - zp

