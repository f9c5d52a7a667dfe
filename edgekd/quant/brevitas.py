"""Float model -> Brevitas QAT model at W/A bits, following a target's quantizer conventions.

The model is traced with torch.fx, batch norms are merged into the convolutions (so that the
exported graph has nothing between a quantized conv and its requantization), and Brevitas's
graph passes insert quantizers: an 8-bit signed quantizer at the input, activation quantizers
at the ReLUs, requantization of residual adds with aligned scales, and quantized compute
layers. Every quantizer is built from one consistent set of maps so that all bit widths agree
(overriding bits in only some of Brevitas's default maps breaks residual alignment).

Scales are learned (initialised from statistics of the first training batches); weights are
symmetric, narrow-range, per output channel by default; the first and last compute layers keep
8-bit weights unless the caller says otherwise. Per-layer rules (``QuantSpec.layer_bits``,
quant.layerbits) then set any layer's weight bits (the quantizer Brevitas builds for that layer's
path) and the bits of the activations it reads (the quantizer in front of it, rebuilt).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..config.options import SAME
from ..core.errors import EdgekdError
from . import layerbits, mobile
from .spec import QuantSpec

# ---- tracing ---------------------------------------------------------------------------------------

def trace(model: nn.Module):
    """Symbolically trace ``model``; on failure name the module where tracing broke.

    Uses Brevitas's vendored torch.fx (``brevitas.fx``), whose graphs its passes understand.
    """
    from brevitas import fx

    class _Tracer(fx.Tracer):
        current: list[str] = []

        def call_module(self, m, forward, args, kwargs):
            path = self.path_of_module(m)
            self.current.append(path)
            out = super().call_module(m, forward, args, kwargs)
            self.current.pop()
            return out

    tracer = _Tracer()
    was_training = model.training
    model.eval()  # trace the inference graph: train-only branches (stochastic depth) drop out
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tracer.trace(model)
    except Exception as e:
        where = tracer.current[-1] if tracer.current else "<top-level forward>"
        reason = " ".join(str(e).split())[:200]
        raise EdgekdError(f"the student does not trace with torch.fx at module '{where}': {reason}",
                          "remove data-dependent control flow from that module's forward, or choose "
                          "another --student") from None
    finally:
        model.train(was_training)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.train(was_training)
    return gm


def _float_method(value, method: str, *args, **kwargs):
    """``value.method(*args, **kwargs)`` on the float value of a QuantTensor (or a plain tensor)."""
    return getattr(getattr(value, "value", value), method)(*args, **kwargs)


def _float_methods(gm) -> None:
    """Tensor methods that Brevitas's QuantTensor lacks (``x.chunk`` in ShuffleNet's channel split,
    ``x.split``...) are called on the dequantized value instead; the next quantizer requantizes."""
    from brevitas.quant_tensor import IntQuantTensor

    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_method" and not hasattr(IntQuantTensor, node.target) and hasattr(torch.Tensor, node.target):
            node.op, node.args = "call_function", (node.args[0], node.target, *node.args[1:])
            node.target = _float_method
            changed = True
    if changed:
        gm.recompile()


# ---- quantizer maps ---------------------------------------------------------------------------------

def _weight_quant(spec: QuantSpec, bits):
    from brevitas.core.restrict_val import RestrictValueType
    from brevitas.core.scaling.standalone import ParameterFromStatsFromParameterScaling
    from brevitas.quant import fixed_point, scaled_int

    per_channel = spec.weight_scaling == "per_channel"
    if spec.scale_type == "po2":
        base = fixed_point.Int8WeightPerChannelFixedPoint if per_channel else fixed_point.Int8WeightPerTensorFixedPoint
    else:
        base = scaled_int.Int8WeightPerChannelFloat if per_channel else scaled_int.Int8WeightPerTensorFloat
    q = base.let(bit_width=bits, scaling_impl=ParameterFromStatsFromParameterScaling)
    return q if spec.scale_type == "po2" else q.let(restrict_scaling_type=RestrictValueType.LOG_FP)


def _act_quant(spec: QuantSpec, bits: int, signed: bool, percentile: float | None = None):
    from brevitas.core.restrict_val import RestrictValueType
    from brevitas.quant import fixed_point, scaled_int

    if spec.scale_type == "po2":
        base = fixed_point.Int8ActPerTensorFixedPoint if signed else fixed_point.Uint8ActPerTensorFixedPoint
    else:
        base = scaled_int.Int8ActPerTensorFloat if signed else scaled_int.Uint8ActPerTensorFloat
    # Scales start from a high percentile of the first 30 training batches, then are learned in the
    # log domain (an optimizer step is then a relative change, whatever the scale's size). At 2 bits
    # the 99.999th percentile (about the maximum) leaves most activations on levels 0 and 1 and costs
    # whole epochs to undo: the 99th starts closer (Fashion-MNIST KD+QAT W2A2: 87.4% -> 89.6%).
    q = base.let(bit_width=bits, high_percentile_q=percentile or act_init_percentile(bits), collect_stats_steps=30)
    return q if spec.scale_type == "po2" else q.let(restrict_scaling_type=RestrictValueType.LOG_FP)


def act_init_percentile(bits: int) -> float:
    """Percentile of the first batches' activations an activation scale starts from."""
    return 99.0 if bits <= 2 else 99.999


def _layer_weight_quant(spec: QuantSpec, bits: int, module):
    """The weight quantizer of one layer at ``bits``; its scale starts from the absolute maximum, or
    from the error-minimising threshold for a low-bit depthwise layer and any 2-bit one
    (quant.mobile.mse_threshold_init)."""
    from brevitas.core.stats import AbsMax

    mse = mobile.mse_threshold_init(module, bits)
    return _weight_quant(spec, bits).let(scaling_stats_impl=mobile.MSEThreshold if mse else AbsMax)


def _maps(spec: QuantSpec, weight_bits: dict[str, int]):
    """The three maps Brevitas's graph passes take, all at ``spec``'s bits and conventions;
    ``weight_bits``: each compute layer's weight bits by module path (quant.layerbits)."""
    import brevitas.nn as qnn
    from brevitas.quant.scaled_int import Int32Bias

    # Brevitas calls a lambda with the float layer and its module path (graph.base.ModuleToModule)
    layer_kwargs = {"weight_quant": lambda module, name: _layer_weight_quant(
                        spec, weight_bits.get(name, spec.weight_bits), module),
                    "bias_quant": Int32Bias if spec.bias == "int32" else None,
                    "return_quant_tensor": False}
    signed_act = {"act_quant": _act_quant(spec, spec.act_bits, True), "return_quant_tensor": True}
    relu_signed = spec.act_after_relu == "signed"
    relu_act = {"act_quant": _act_quant(spec, spec.act_bits, relu_signed), "return_quant_tensor": True}
    compute = {nn.Conv2d: (qnn.QuantConv2d, layer_kwargs), nn.Conv1d: (qnn.QuantConv1d, layer_kwargs),
               nn.Linear: (qnn.QuantLinear, layer_kwargs)}
    acts = {nn.ReLU: (qnn.QuantReLU, relu_act), nn.ReLU6: (qnn.QuantReLU, relu_act)}
    identity = {"signed": (qnn.QuantIdentity, signed_act),
                "unsigned": (qnn.QuantIdentity, relu_act if not relu_signed else signed_act)}
    return compute, acts, identity


def _layer_key(module) -> tuple:
    """A compute layer's type and weight shape."""
    w = getattr(module, "weight", None)
    return (type(module).__name__.replace("Quant", ""), tuple(w.shape) if w is not None else None)


def _first_last(layers: list, by: str = "path") -> list[str]:
    """Module paths of the first and last compute layers in graph order. ``by`` "shape" (runs
    written before per-layer bits, QuantSpec.first_last_by): one whose type and weight shape a
    hidden layer shares is left out, as Brevitas's injector, which sees only shapes, did then."""
    if not layers:
        raise EdgekdError("the model has no Conv or Linear layer to quantize", "choose another --student")
    ends = [layers[0], layers[-1]]
    if len(layers) > 2 and by == "shape":
        middle = {_layer_key(m) for _, m in layers[1:-1]}
        ends = [(p, m) for p, m in ends if _layer_key(m) not in middle]  # never raise a hidden layer's bits
    return [p for p, _ in ends]


def layer_weight_bits(gm, spec: QuantSpec) -> dict[str, dict]:
    """Per compute layer path of traced ``gm``: its weight bits and the act bits asked for its input
    (the first/last-layer bits of ``spec``, then its layer_bits rules)."""
    layers = layerbits.compute_layers(gm)
    ends = _first_last(layers, spec.first_last_by) if spec.first_last_bits != SAME else []
    return layerbits.resolve(layers, spec.layer_bits, spec.weight_bits,
                             {p: spec.first_last_weight_bits for p in ends})


def quantize(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Return a QAT copy of float ``model`` (weights copied, batch norms merged).

    ``model`` itself is left untouched (Brevitas merges batch norms in place, so we copy first).
    """
    import copy

    from brevitas import config
    from brevitas.graph import quantize_impl as qi
    from brevitas.graph.quantize import align_input_quant, preprocess_for_quantize

    gm = trace(copy.deepcopy(model))
    gm = preprocess_for_quantize(gm, trace_model=False, merge_bn=True)
    _float_methods(gm)
    resolved = layer_weight_bits(gm, spec)
    compute, acts, identity = _maps(spec, {p: r["weight"] for p, r in resolved.items()})
    input_quant = (identity["signed"][0], {**identity["signed"][1],
                                           "act_quant": _act_quant(spec, spec.input_bits, True)})
    unsigned = (nn.ReLU, nn.ReLU6) if spec.act_after_relu == "unsigned" else ()
    ignore = config.IGNORE_MISSING_KEYS
    config.IGNORE_MISSING_KEYS = True
    was_training = gm.training
    gm.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = qi.inp_placeholder_handler(gm, input_quantizer=input_quant)
            gm = qi.act_handler(gm, layer_map=acts)
            gm = qi.add_output_quant_handler(gm, identity, acts, unsigned)
            gm = qi.residual_handler(gm, identity, acts, unsigned, align_input_quant)
            gm = qi.layer_handler(gm, layer_map=compute, requantize_output=True, quant_identity_map=identity,
                                  quant_act_map=acts, unsigned_act_tuple=unsigned)
            from brevitas.graph.quantize import DisableLastReturnQuantTensor

            gm = DisableLastReturnQuantTensor().apply(gm)
            make_act = lambda bits, signed, pct: _act_quant(spec, bits, signed, pct)  # noqa: E731
            mobile.rewrite(gm, spec, make_act)
            _drop_logits_quant(gm)
            orphans = layerbits.apply_act_bits(gm, {p: r["act"] for p, r in resolved.items()}, make_act, spec)
    finally:
        config.IGNORE_MISSING_KEYS = ignore
    gm.train(was_training)
    gm.edgekd_spec = spec  # read by export (qdq: which integer type activations are stored in)
    gm.edgekd_act_orphans = orphans  # layers whose asked act bits no single quantizer could take
    return gm


def _drop_logits_quant(gm) -> None:
    """Remove the requantizer Brevitas puts on the network's output: logits stay in float
    (the last layer's accumulator, dequantized) instead of being rounded to ``act_bits``."""
    import brevitas.nn as qnn

    output = next(n for n in gm.graph.nodes if n.op == "output")
    node = output.args[0]
    if getattr(node, "op", None) == "call_module" and isinstance(gm.get_submodule(node.target), qnn.QuantIdentity):
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
        gm.recompile()


def materialize(model: nn.Module, input_shape) -> None:
    """Create the scale parameters Brevitas builds lazily on the first forward pass, so that a
    freshly quantized model has the same state_dict keys as a trained one."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    model.train(was_training)


def is_quantizer_param(name: str) -> bool:
    """Scale / zero-point parameters of quantizers (trained without weight decay)."""
    return any(k in name for k in ("scaling_impl", "zero_point_impl", "int_scaling_impl"))


def describe(model: nn.Module) -> list[dict]:
    """Per quantized layer: name, kind, weight bits, and the activation bits it produces."""
    import brevitas.nn as qnn

    rows = []
    for name, m in model.named_modules():
        if isinstance(m, (qnn.QuantConv2d, qnn.QuantConv1d, qnn.QuantLinear)):
            rows.append({"name": name, "kind": type(m).__name__, "weight_bits": int(m.weight_quant.bit_width())})
        elif isinstance(m, (qnn.QuantReLU, qnn.QuantIdentity)):
            bw = m.act_quant.bit_width()
            rows.append({"name": name, "kind": type(m).__name__,
                         "act_bits": int(bw) if bw is not None else None, "signed": bool(m.act_quant.is_signed)})
    return rows


def runtime_state(model: nn.Module) -> dict:
    """What ``state_dict`` leaves out of Brevitas's activation-scale initialisation: the number of
    statistics steps taken so far, the running statistics and the raw scale parameter (during the
    first ``collect_stats_steps`` training steps ``state_dict`` stores the statistics in place of
    the parameter, and loading it ends the collection). Saved in training checkpoints so that a run
    interrupted during those steps resumes exactly."""
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "collect_stats_steps") and hasattr(m, "counter") and hasattr(m, "buffer"):
            out[name] = {"counter": int(m.counter), "buffer": m.buffer.detach().clone(),
                         "value": m.value.detach().clone()}
    return out


def restore_runtime_state(model: nn.Module, state: dict) -> None:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, s in state.items():
            m = modules[name]
            m.counter = s["counter"]
            m.buffer.copy_(s["buffer"])
            m.value.copy_(s["value"])
