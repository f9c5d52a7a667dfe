"""Quantizers for mobile blocks: smooth activations (Hardswish, SiLU, GELU, sigmoid gates) and
depthwise convolutions, which Brevitas's graph passes treat like any other layer.

Measured on a depthwise-separable / SE / Hardswish model trained on digits (3 float epochs, 90.3%),
right after quantization at W4A4 (30 batches of scale statistics, as QAT starts), by quantizing one
group of quantizers at a time (accuracy, relative logit error against float):

- conv outputs requantized at ``act_bits`` in front of the activation (``conv -> Q -> Hardswish``,
  Brevitas's output requantization, because a non-ReLU activation is not a quantizer): 81.3%, 0.50;
- the activation's output at ``act_bits``, signed (``Hardswish -> Q -> conv``): 70.5%, 0.62; after
  the SE gate's product: 78.8%, 0.62; SE gate input, pooled input: 90.3%, 90.0% (harmless);
- 4-bit weights, depthwise / pointwise: 90.0% / 89.7% each; all together 52.9%, 0.84.
QAT (3 epochs) reached 70.8%; at W2A2 the loss stayed at 2.30 (chance), and the same model with ReLU
in place of Hardswish collapsed as well: 2-bit depthwise weights cost most (W2A8: 39.8%; with
8-bit depthwise weights 86.1%).

Three changes, each only where such a layer is present (a ReLU-only graph without depthwise
convolutions is left exactly as it was):

- the requantizer in front of a smooth activation keeps 8 bits (``PRE_ACTIVATION_BITS``): it hands
  the accumulator to the activation and feeds no multiplier; the activation's output is then
  quantized at ``act_bits`` once, as a ReLU's is (W4A4 at init: 52.9% -> 58.5%);
- quantizers fed by Hardswish/SiLU-like activations (directly or through pooling, reshapes and the
  SE product) start their scale from a lower percentile (``after_smooth_percentile``: 58.5% -> 83.3%
  at init with the 99.9th);
- depthwise weight scales at up to 4 bits start from the threshold that minimises each channel's
  quantization error (``MSEThreshold``) instead of its absolute maximum (W2A8 QAT 39.8% -> 48.2%).
  At 8 bits (activations and weights) the graph is the one Brevitas builds.

Measured and rejected at 4 bits: unsigned quantizers after Hardswish (under the unsigned convention):
the sliver in [-0.375, 0) carries information, clipping it costs 12 points at W4A4 init (58.5% -> 46.0%).
At 2 bits they are unsigned (``after_smooth_signed``: a signed 2-bit grid keeps one positive level),
and every 2-bit weight scale starts from ``MSEThreshold`` (``mse_threshold_init``).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

PRE_ACTIVATION_BITS = 8

# Activations that are not quantizers themselves: (module types, functions, tensor methods).
SMOOTH_MODULES = (nn.Hardswish, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.Mish, nn.ELU,
                  nn.SELU, nn.CELU, nn.Softplus, nn.LeakyReLU, nn.PReLU, nn.Hardtanh)
SMOOTH_FUNCTIONS = (F.hardswish, F.silu, F.gelu, F.sigmoid, torch.sigmoid, F.hardsigmoid, torch.tanh, F.tanh,
                    F.mish, F.elu, F.selu, F.celu, F.softplus, F.leaky_relu, F.hardtanh)
SMOOTH_METHODS = ("sigmoid", "tanh")
# Of those, the one-sided ones: bounded below (Hardswish >= -0.375, SiLU >= -0.28, GELU >= -0.17,
# Mish >= -0.31, sigmoids >= 0) with a long positive tail, like ReLU's (listed too: a product of a ReLU
# branch and a gate is one-sided as well).
ONE_SIDED_MODULES = (nn.Hardswish, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardsigmoid, nn.Mish, nn.Softplus,
                     nn.ReLU, nn.ReLU6)
ONE_SIDED_FUNCTIONS = (F.hardswish, F.silu, F.gelu, F.sigmoid, torch.sigmoid, F.hardsigmoid, F.mish,
                       F.softplus, F.relu, torch.relu, F.relu6)
# Ops that keep a one-sided value one-sided.
PASS_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Identity,
                nn.Dropout)
PASS_FUNCTIONS = (torch.flatten, F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, torch.mean)
PASS_METHODS = ("mean", "flatten", "view", "reshape", "contiguous")


def _module(gm, node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def is_smooth(gm, node) -> bool:
    """Whether fx ``node`` applies a non-ReLU activation that Brevitas leaves in float."""
    if node.op == "call_module":
        return isinstance(_module(gm, node), SMOOTH_MODULES)
    if node.op == "call_function":
        return node.target in SMOOTH_FUNCTIONS
    return node.op == "call_method" and node.target in SMOOTH_METHODS


def _one_sided_sources(gm, node, depth: int = 0):
    """The activations ``node``'s value comes from if it is one-sided by construction (through
    pooling, reshapes and products), else None."""
    if depth > 8 or not hasattr(node, "op"):
        return None
    if node.op == "call_module":
        m = _module(gm, node)
        if isinstance(m, ONE_SIDED_MODULES):
            return [node]
        ok = isinstance(m, PASS_MODULES)
    elif node.op == "call_function":
        if node.target in ONE_SIDED_FUNCTIONS:
            return [node]
        if node.target in (operator.mul, torch.mul):
            parts = [_one_sided_sources(gm, a, depth + 1) for a in node.args[:2]]
            return None if any(p is None for p in parts) else [n for p in parts for n in p]
        ok = node.target in PASS_FUNCTIONS
    else:
        ok = node.op == "call_method" and node.target in PASS_METHODS
    return _one_sided_sources(gm, node.args[0], depth + 1) if ok and node.args else None


def _after_smooth(gm, node) -> bool:
    """Whether ``node`` is a one-sided value made by at least one smooth activation (ReLU-only
    paths are left as Brevitas quantizes them)."""
    leaves = _one_sided_sources(gm, node)
    return bool(leaves) and any(is_smooth(gm, n) for n in leaves)


def _quant_identities(gm):
    import brevitas.nn as qnn

    return [n for n in gm.graph.nodes if isinstance(_module(gm, n), qnn.QuantIdentity)]


def _replace(gm, node, act_quant) -> None:
    import brevitas.nn as qnn

    gm.add_submodule(node.target, qnn.QuantIdentity(act_quant=act_quant, return_quant_tensor=True))


def after_smooth_percentile(bits: int) -> float | None:
    """Percentile of the first batches an activation scale after a smooth activation starts from
    (None: the one every activation scale starts from, ``quant.brevitas.act_init_percentile``).
    Hardswish/SiLU outputs pile up in [-0.375, 1] with a long positive tail: the 99.999th percentile
    (about the maximum, right at 8 bits) leaves most values on two or three levels at 4 bits.
    Measured (the Hardswish/SE model of the module docstring, right after quantization, W4A4, 8-bit
    pre-activation requantizers): 99.999th 58.5%, 99.99th 70.2%, 99.9th 83.3%, 99.5th 80.2%, 99th
    76.6% (float 90.3%); at W8A8 the 99.9th costs 0.6 point against the 99.999th. 5 to 7 bits take
    the 99.99th (between the measured points, not measured themselves); 2 and 8 bits the general one."""
    if bits <= 2 or bits >= 8:
        return None
    return 99.9 if bits <= 4 else 99.99


UNSIGNED_AFTER_SMOOTH_BITS = 2  # up to this many bits, quantizers after one-sided smooth activations are unsigned


def after_smooth_signed(spec, bits: int, signed: bool) -> bool:
    """Whether a quantizer after a one-sided smooth activation (Hardswish, SiLU, an SE product) is
    signed at ``bits`` (``signed``: what Brevitas chose). Above 2 bits it stays signed: the sliver
    in [-0.375, 0) carries information (unsigned cost 12 points at W4A4 init, module docstring). At
    2 bits a signed grid {-2, -1, 0, 1} x s keeps one positive level for a value that is mostly
    positive; unsigned {0, 1, 2, 3} x s keeps three. Measured (mobile-student, Fashion-MNIST, 10,000
    training images, W2A2 with depthwise=W8A8, 3 QAT epochs at lr 1e-3, KD from its 91.10% float
    student): signed 50.16%, unsigned 72.03%. Targets whose activations are signed whatever they
    follow (``act_after_relu = "signed"``: TensorRT) keep ``signed``."""
    if spec.act_after_relu != "unsigned":
        return bool(signed)
    return bits > UNSIGNED_AFTER_SMOOTH_BITS


def rewrite(gm, spec, act_quant) -> int:
    """Quantizers around smooth activations in quantized graph module ``gm``, in place:
    ``act_quant(bits, signed, percentile)`` builds an activation quantizer with ``spec``'s
    conventions. Returns how many quantizers were replaced (0 in a graph without such activations)."""
    if spec.act_bits >= PRE_ACTIVATION_BITS or not any(is_smooth(gm, n) for n in gm.graph.nodes):
        return 0  # at 8-bit activations the graph stays the one Brevitas builds
    changed = 0
    for node in _quant_identities(gm):
        users = list(node.users)
        if users and all(is_smooth(gm, u) for u in users):
            _replace(gm, node, act_quant(PRE_ACTIVATION_BITS, True, None))
        elif node.args and _after_smooth(gm, node.args[0]):
            signed = after_smooth_signed(spec, spec.act_bits, _module(gm, node).act_quant.is_signed)
            _replace(gm, node, act_quant(spec.act_bits, signed, after_smooth_percentile(spec.act_bits)))
        else:
            continue
        changed += 1
    return changed


# ---- depthwise weights --------------------------------------------------------------------------------

MSE_THRESHOLD_BITS = 4  # up to this many depthwise weight bits; above, the absolute maximum loses little
MSE_THRESHOLD_ANY_BITS = 2  # up to this many bits, every layer's weight scale starts from MSEThreshold


def mse_threshold_init(module, bits: int) -> bool:
    """Whether ``module``'s weight scale at ``bits`` starts from ``MSEThreshold``: a depthwise layer up
    to 4 bits (nine weights per channel), any layer at 2 bits, where the grid is ternary ({-t, 0, t})
    and a threshold at the absolute maximum rounds most weights of a channel to zero. Measured
    (mobile-student, Fashion-MNIST, 10,000 training images, W2A2 depthwise=W8A8, unsigned 2-bit
    activations after Hardswish, 3 QAT epochs at lr 1e-3, KD from its float student): absolute maximum
    72.03%, MSEThreshold 77.35%."""
    return bits <= MSE_THRESHOLD_ANY_BITS or (is_depthwise(module) and bits <= MSE_THRESHOLD_BITS)


def is_depthwise(module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


class MSEThreshold(nn.Module):
    """Per-output-channel threshold (the value the largest level stands for) that minimises the
    squared error of quantizing the channel's weights, searched over fractions of its absolute
    maximum. The absolute maximum itself (Brevitas's default) suits channels of hundreds of weights;
    a depthwise channel has nine, and at 2 bits (levels -t, 0, t) a threshold at the largest of them
    rounds most of the others to zero."""

    def __init__(self, stats_reduce_dim, bit_width, steps: int = 64):
        super().__init__()
        self.dim, self.levels, self.steps = stats_reduce_dim, 2 ** (int(bit_width) - 1) - 1, steps

    @torch.no_grad()
    def forward(self, x):
        amax = x.abs().amax(dim=self.dim).clamp_min(1e-8)
        best, best_err = amax.clone(), torch.full_like(amax, float("inf"))
        for f in torch.linspace(1.0 / self.steps, 1.0, self.steps).tolist():
            t = amax * f if self.dim is None else (amax * f).unsqueeze(self.dim)  # None: one scale per tensor
            q = torch.clamp(torch.round(x / t * self.levels), -self.levels, self.levels) * t / self.levels
            err = ((q - x) ** 2).sum() if self.dim is None else ((q - x) ** 2).sum(dim=self.dim)
            better = err < best_err
            best = torch.where(better, amax * f, best)
            best_err = torch.where(better, err, best_err)
        return best


def default_qat_lr(lr: float, warm: bool, student: nn.Module, log=None) -> float:
    """QAT's lr without --qat-lr: lr/4 after a float warm start, else lr; depthwise students keep lr
    (measured in README: Mobile blocks)."""
    if not warm:
        return lr
    if any(is_depthwise(m) for m in student.modules()):
        if log:
            log(f"QAT learning rate {lr:g} (the float phase's): the student has depthwise convolutions")
        return lr
    return lr / 4
