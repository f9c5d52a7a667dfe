"""Where a quantized student loses accuracy: per Conv / Linear layer, the error between the float
and the fake-quant model, measured on real samples (``edgekd explain``).

The float reference is a quantized model with every quantizer off (same weights, batch norms
merged), so that only quantization differs, not training: the student itself after post-training
quantization, the float student quantized by calibration for a student trained with its quantizers
(``layer_errors``'s ``probe``; its quantizers off never were a float model). Per layer, as SQNR in dB
(10 log10 of signal over error power, higher is better):

- ``logits_db``: at the logits, with only this layer quantized (its weights and the activations it
  reads), the rest in float: what this layer alone does to the output; the ranking (worst first)
  that says which layer breaks, as per-layer sensitivity analyses do (AIMET, NNCF);
- ``isolated_db``: the same, at this layer's own output; ``weights_db`` / ``inputs_db``: only its
  weights / only its input activations quantized (which of W and A to raise);
- ``cumulative_db``: the whole model quantized: the error that has reached this layer's output;
- ``raised_db``: at the logits, the whole model quantized but this layer (its weights and the
  quantizer in front of it, which other layers reading the same activations share) in float, and
  ``gain_db``, its gain over the whole model quantized: what keeping this layer at more bits buys
  (AIMET's per-layer "disable one quantizer" analysis); the same per layer type (``groups``: every
  depthwise layer raised together, ...), which is what ``--layer-bits depthwise=W8A8`` does.

Biases stay in float while measuring (an int32 bias needs its input's scale, which a float input
lacks; its rounding error is negligible against the weights' and activations').
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch

from . import layerbits
from .autobits import packed_bytes

EXACT = None  # how an error-free comparison is reported (JSON has no infinity)


def sqnr(ref, test) -> float | None:
    """10 log10(sum ref^2 / sum (ref - test)^2) in dB; None when ``test`` equals ``ref`` exactly."""
    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    noise = float(np.sum((ref - test) ** 2))
    if noise == 0.0:
        return EXACT
    signal = float(np.sum(ref ** 2))
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def _proxies(model):
    from brevitas.proxy.quant_proxy import QuantProxyFromInjector

    return [m for m in model.modules() if isinstance(m, QuantProxyFromInjector)]


@contextmanager
def quantized_only(model, keep):
    """Within: every quantizer of ``model`` off but those in ``keep`` (a set of proxy modules, or
    None: all on, the fake-quant model); no layer returns QuantTensors (a float input has no scale)."""
    proxies = _proxies(model)
    saved = [(p, p.disable_quant) for p in proxies]
    returns = [(m, m.return_quant_tensor) for m in model.modules() if hasattr(m, "return_quant_tensor")]
    try:
        if keep is not None:
            for p in proxies:
                p.disable_quant = p not in keep
            for m, _ in returns:
                m.return_quant_tensor = False
        yield model
    finally:
        for p, state in saved:
            p.disable_quant = state
        for m, state in returns:
            m.return_quant_tensor = state


def _value(v):
    return getattr(v, "value", v)


def _interpreter(gm):
    """The fx Interpreter of ``gm``'s fx (Brevitas traces with its own copy of torch.fx)."""
    from brevitas.backport.fx.graph_module import GraphModule
    from brevitas.backport.fx.interpreter import Interpreter
    from torch.fx import Interpreter as TorchInterpreter

    return Interpreter if isinstance(gm, GraphModule) else TorchInterpreter


@torch.no_grad()
def record(gm, x: torch.Tensor, names: set[str], batch: int = 256) -> dict[str, np.ndarray]:
    """The values of the fx nodes named ``names`` (and the output, ``"output"``) over inputs ``x``."""
    out: dict[str, list] = {}

    class _Recorder(_interpreter(gm)):
        def run_node(self, n):
            value = super().run_node(n)
            if n.name in names:
                out.setdefault(n.name, []).append(_value(value).detach().float().cpu().numpy().copy())
            return value

    for i in range(0, len(x), batch):
        logits = _Recorder(gm).run(x[i: i + batch])
        out.setdefault("output", []).append(_value(logits).detach().float().cpu().numpy().copy())
    return {k: np.concatenate(v) for k, v in out.items()}


def output_quantizer(gm, node):
    """The fx node of the activation quantizer that requantizes compute ``node``'s output (its only
    user, or None: the logits, or an output that feeds several ops)."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module" \
            and isinstance(gm.get_submodule(users[0].target), layerbits._act_quantizers()):
        return users[0]
    return None


def _layer_proxies(gm, node) -> tuple[set, set]:
    """The quantizers of compute ``node``: its weights', and the one in front of it (if any)."""
    q = layerbits.input_quantizer(gm, node)
    return {gm.get_submodule(node.target).weight_quant}, ({gm.get_submodule(q.target).act_quant} if q else set())


def _alone(gm, x, node, ref: dict, batch: int) -> dict:
    """The SQNRs of compute ``node`` quantized alone (weights and inputs, weights only, inputs only)."""
    weights, inputs = _layer_proxies(gm, node)
    with quantized_only(gm, weights | inputs):
        both = record(gm, x, {node.name}, batch)
    with quantized_only(gm, weights):
        w_only = record(gm, x, {node.name}, batch)[node.name]
    a_only = None
    if inputs:
        with quantized_only(gm, inputs):
            a_only = record(gm, x, {node.name}, batch)[node.name]
    return {"logits_db": sqnr(ref["output"], both["output"]), "isolated_db": sqnr(ref[node.name], both[node.name]),
            "weights_db": sqnr(ref[node.name], w_only),
            "inputs_db": sqnr(ref[node.name], a_only) if a_only is not None else None}


def _raised(gm, x, off: set, ref_out: np.ndarray, base: dict | None, batch: int) -> dict:
    """The whole model quantized but the quantizers ``off`` (biases in float, as everywhere here): at
    the logits, SQNR and top-1 agreement with the float model, and the gain in dB over ``base`` (the
    same with nothing off; None: this is the base)."""
    from brevitas.proxy.parameter_quant import BiasQuantProxyFromInjector

    with quantized_only(gm, {p for p in _proxies(gm) if not isinstance(p, BiasQuantProxyFromInjector)} - off):
        out = record(gm, x, set(), batch)["output"]
    db = sqnr(ref_out, out)
    gain = None if base is None or db is None or base["raised_db"] is None else db - base["raised_db"]
    return {"raised_db": db, "gain_db": gain, "raised_agreement": float(np.mean(ref_out.argmax(1) == out.argmax(1)))}


def groups(gm, x, rows: list[dict], ref_out: np.ndarray, base: dict, batch: int = 256) -> list[dict]:
    """Per layer type of ``rows`` (depthwise, pointwise, conv, linear): every layer of that type
    raised to float together (``_raised``), and ``alone_db``, the SQNR at the logits with only that
    type's layers quantized (weights and inputs; the rest in float); the most gaining type first."""
    by_type: dict[str, list[str]] = {}
    for r in rows:
        by_type.setdefault(r["type"], []).append(r["name"])
    nodes = {n.target: n for n in layerbits.compute_nodes(gm)}
    out = []
    for kind, names in by_type.items():
        off = set().union(*(a | b for a, b in (_layer_proxies(gm, nodes[n]) for n in names)))
        with quantized_only(gm, off):
            alone = sqnr(ref_out, record(gm, x, set(), batch)["output"])
        out.append({"group": kind, "layers": names, "alone_db": alone} | _raised(gm, x, off, ref_out, base, batch))
    return most_gain_first(out)


def layer_errors(gm, x: torch.Tensor, batch: int = 256, probe=None) -> tuple[list[dict], dict]:
    """Per Conv / Linear layer of quantized graph module ``gm`` (graph order): name, type, bits,
    weight parameters, the SQNRs of the module docstring on the images ``x``; and the logits'
    comparison (``logits``: SQNR and top-1 agreement float vs fake-quant, and the same for the probe
    with biases in float, the base of the gains), the per-type ``groups``, and the fake-quant values
    of every layer's output quantizer (``taps``, for the runtime comparison).

    ``probe`` (default ``gm``): a model quantized as ``gm`` (the same layers and bits) whose
    quantizers off give the float student, on which the per-layer sensitivities (``logits_db``,
    ``isolated_db``, ``weights_db``, ``inputs_db``, ``raised_db``, ``gain_db``, ``groups``) are measured
    and against which ``gm``'s layer outputs and logits are compared. For a student trained with its
    quantizers (QAT), ``gm`` with its quantizers off was never a float model: pass its float student
    quantized by calibration (pipeline.explain)."""
    probe = gm if probe is None else probe
    gm.eval(), probe.eval()
    nodes, probe_nodes = layerbits.compute_nodes(gm), layerbits.compute_nodes(probe)
    if [n.target for n in nodes] != [n.target for n in probe_nodes]:
        raise ValueError("the probe model's Conv / Linear layers are not the student's")
    taps = {n.name: q.name for n in nodes if (q := output_quantizer(gm, n)) is not None}
    with quantized_only(probe, set()):
        ref = record(probe, x, {n.name for n in probe_nodes}, batch)
    with quantized_only(gm, None):
        fake = record(gm, x, {n.name for n in nodes} | set(taps.values()), batch)
    base = _raised(probe, x, set(), ref["output"], None, batch)
    rows = [row | {"params": int(probe.get_submodule(pn.target).weight.numel())} | _alone(probe, x, pn, ref, batch)
            | {"cumulative_db": sqnr(ref[pn.name], fake[node.name])}
            | _raised(probe, x, set.union(*_layer_proxies(probe, pn)), ref["output"], base, batch)
            for row, node, pn in zip(layerbits.table(gm), nodes, probe_nodes)]
    logits = {"sqnr_db": sqnr(ref["output"], fake["output"]),
              "top1_agreement": float(np.mean(ref["output"].argmax(1) == fake["output"].argmax(1))),
              "probe_sqnr_db": base["raised_db"], "probe_agreement": base["raised_agreement"]}
    tap_values = {n.target: fake[taps[n.name]] for n in nodes if n.name in taps}
    return rows, {"logits": logits, "taps": tap_values, "fake_logits": fake["output"],
                  "groups": groups(probe, x, rows, ref["output"], base, batch)}


def worst_first(rows: list[dict], key: str = "logits_db") -> list[dict]:
    """``rows`` sorted by ``key`` ascending (lowest SQNR, the worst, first; exact comparisons last)."""
    return sorted(rows, key=lambda r: math.inf if r.get(key) is None else r[key])


def most_gain_first(rows: list[dict]) -> list[dict]:
    """``rows`` sorted by ``gain_db`` descending (the layer or type whose raise gains most first; one
    whose raise leaves the logits exact, ``raised_db`` None, before all)."""
    def key(r):
        if r.get("raised_db", 0.0) is None:
            return -math.inf
        return math.inf if r.get("gain_db") is None else -r["gain_db"]
    return sorted(rows, key=key)


RAISE_BITS = 8  # what a raise is priced at: ``--layer-bits TYPE=W8A8``


def noise_power(db: float | None) -> float:
    """The error power relative to the signal of an SQNR of ``db`` dB (0.0: exact; a zero signal,
    -inf dB, counts as 1e30: finite, so shares stay numbers)."""
    return 0.0 if db is None else min(10.0 ** (-db / 10.0) if math.isfinite(db) else 1e30, 1e30)


def add_costs(rows: list[dict], groups_: list[dict], raise_bits: int = RAISE_BITS) -> None:
    """Price every layer of ``rows`` and every layer type of ``groups_`` (``layer_errors``), in place:
    ``noise_share``, its share of the noise power the layers make at the logits each quantized alone
    (``logits_db``, summed as independent noises add; it stays measurable where the whole model
    quantized has collapsed and raise gains are noise); ``raise_bytes``, the packed weight bytes that
    raising its weights to ``raise_bits`` adds; ``share_per_kb``, the one per KiB of the other (None:
    its weights are there already). Most noise removed per byte first is the greedy order of a
    knapsack under a size budget (``best_buy_first``)."""
    noise = {r["name"]: noise_power(r["logits_db"]) for r in rows}
    total = sum(noise.values()) or 1.0
    cost = {r["name"]: max(0, packed_bytes(r["params"], raise_bits) - packed_bytes(r["params"], r["weight_bits"]))
            for r in rows}
    for item, names in [(r, [r["name"]]) for r in rows] + [(g, g["layers"]) for g in groups_]:
        share, extra = sum(noise[n] for n in names) / total, sum(cost[n] for n in names)
        item.update(noise_share=share, raise_bytes=extra, share_per_kb=share / (extra / 1024) if extra else None)


def best_buy_first(rows: list[dict]) -> list[dict]:
    """``rows`` priced by ``add_costs``, most noise share per KiB raised first; those whose weights are
    at the raise width already (nothing to buy in bytes) after, most noise first."""
    return sorted(rows, key=lambda r: (1, -r["noise_share"]) if r["share_per_kb"] is None else (0, -r["share_per_kb"]))


RANKS = {"gain": most_gain_first, "alone": worst_first, "bytes": best_buy_first}  # explain --rank


@torch.no_grad()
def weight_noise(model, spec, widths, names, x: torch.Tensor, batch: int = 256) -> dict[str, dict[int, float]]:
    """Per layer of ``names`` (module paths of float ``model``'s Conv / Linear layers) and width of
    ``widths``: the error power at the logits, relative to the signal (10^(-SQNR/10); 0.0: exact), of
    the model with only that layer's weights quantized at that width (activations and biases in float:
    what the choice of that layer's weight bits alone does), on inputs ``x``. ``spec``: the conventions
    (scaling, scale type) the weights are quantized with (quant.autobits)."""
    from dataclasses import replace

    from ..config.options import SAME
    from .brevitas import quantize

    device = next(iter(model.parameters()), torch.empty(0)).device
    x, out, ref, signal = x.to(device), {n: {} for n in names}, None, 1.0
    for bits in widths:
        gm = quantize(model, replace(spec, weight_bits=bits, first_last_bits=SAME, layer_bits=())).eval()
        if ref is None:  # every width's model has the same float weights: one reference
            with quantized_only(gm, set()):
                ref = record(gm, x, set(), batch)["output"].astype(np.float64)
            signal = float(np.sum(ref ** 2)) or 1.0
        for node in layerbits.compute_nodes(gm):
            if node.target in out:
                with quantized_only(gm, {gm.get_submodule(node.target).weight_quant}):
                    test = record(gm, x, set(), batch)["output"]
                noise = float(np.sum((ref - test) ** 2)) / signal
                out[node.target][bits] = noise if math.isfinite(noise) else math.inf
    return out
