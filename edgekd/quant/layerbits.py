"""Per-layer bit widths on a model: resolve rules (``edgekd.config.layerbits``: what a rule is, how
``--layer-bits`` and ``[[bits]]`` tables parse) against a traced student's Conv / Linear layers, set
the bits of the activation quantizer in front of a layer, and tabulate every layer's resolved bits.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from ..config.layerbits import (TYPES, LayerRule, capped, parse_table, parse_text, rules_from,  # noqa: F401
                                TABLE_KEYS)
from ..config.options import shown
from ..core.errors import ConfigError
from ..core.registry import suggest


# ---- resolving rules against a model --------------------------------------------------------------

def compute_nodes(gm) -> list:
    """The fx nodes calling the Conv / Linear layers of traced ``gm``, in graph order, once per layer."""
    from torch import nn

    seen, out = set(), []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in seen \
                and isinstance(gm.get_submodule(node.target), (nn.Conv1d, nn.Conv2d, nn.Linear)):
            seen.add(node.target)
            out.append(node)
    return out


def compute_layers(gm) -> list[tuple[str, object]]:
    """(path, module) of the Conv / Linear layers of traced ``gm``, in graph order."""
    return [(n.target, gm.get_submodule(n.target)) for n in compute_nodes(gm)]


def layer_type(module) -> str:
    """depthwise, pointwise, conv or linear."""
    from torch import nn

    from .mobile import is_depthwise

    if isinstance(module, nn.Linear):
        return "linear"
    if is_depthwise(module):
        return "depthwise"
    pointwise = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1
    return "pointwise" if pointwise else "conv"


def _types(module, index: int, count: int) -> set[str]:
    kind = layer_type(module)
    out = {kind} | ({"conv"} if kind in ("depthwise", "pointwise") else set())
    return out | ({"first"} if index == 0 else set()) | ({"last"} if index == count - 1 else set())


def _glob_matches(path: str, pattern: str) -> bool:
    parts = path.split(".")
    return any(fnmatchcase(".".join(parts[:n]), pattern) for n in range(len(parts), 0, -1))


def matches(rule: LayerRule, path: str, types: set[str]) -> bool:
    return bool(types & set(rule.type)) or any(_glob_matches(path, g) for g in rule.layers)


def resolve(layers: list[tuple[str, object]], rules: tuple[LayerRule, ...], base_weight: int,
            first_last: dict[str, int] | None = None) -> dict[str, dict]:
    """Per layer path: ``weight`` bits and the ``act`` bits asked for its input (None: unchanged).
    ``first_last``: the target's first/last-layer weight bits by path, applied before ``rules``.
    A rule that names no layer is an error listing some layer paths."""
    out = {path: {"weight": (first_last or {}).get(path, base_weight), "act": None} for path, _ in layers}
    for rule in rules:
        hit = [path for i, (path, m) in enumerate(layers) if matches(rule, path, _types(m, i, len(layers)))]
        if not hit:
            close = "".join(suggest(g[:100], TYPES) for g in rule.layers[:1])  # a misspelt type reads as a glob
            raise ConfigError(f"--layer-bits pattern {shown(rule.pattern, 80)} matches no Conv or Linear layer of the student"
                              f"{close}",
                              f"its layers: {_listing([p for p, _ in layers])}")
        for path in hit:
            out[path]["weight"] = rule.weight or out[path]["weight"]
            out[path]["act"] = rule.act or out[path]["act"]
    return out


def _listing(paths: list[str], n: int = 8) -> str:
    shown = ", ".join(paths[:n]) or "(none)"
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > n else "")


def check(model, spec) -> None:
    """Fail early (before any training) when a rule of ``spec.layer_bits`` names no layer of float ``model``."""
    if not spec.layer_bits:
        return
    from .brevitas import trace

    resolve(compute_layers(trace(model)), spec.layer_bits, spec.weight_bits)


# ---- activation bits: the quantizer in front of a layer --------------------------------------------

def _act_quantizers():
    import brevitas.nn as qnn

    return (qnn.QuantIdentity, qnn.QuantReLU)


def input_quantizer(gm, node):
    """The fx node of the activation quantizer whose output layer ``node`` reads (through pooling,
    reshapes and other ops that keep its grid), or None."""
    from .mobile import PASS_FUNCTIONS, PASS_METHODS, PASS_MODULES

    src = node.args[0] if node.args else None
    for _ in range(16):
        if not hasattr(src, "op"):
            return None
        if src.op == "call_module":
            m = gm.get_submodule(src.target)
            if isinstance(m, _act_quantizers()):
                return src
            ok = isinstance(m, PASS_MODULES)
        else:
            ok = (src.op == "call_function" and src.target in PASS_FUNCTIONS) or \
                 (src.op == "call_method" and src.target in PASS_METHODS)
        if not ok or not src.args:
            return None
        src = src.args[0]
    return None


def act_bits_of(module) -> int | None:
    bits = module.act_quant.bit_width()
    return None if bits is None else int(bits)


def apply_act_bits(gm, wanted: dict[str, int], act_quant, spec) -> list[str]:
    """Give the quantizer in front of each layer of ``wanted`` (path -> bits) those bits, in place:
    ``act_quant(bits, signed, percentile)`` builds one with the run's conventions. A quantizer that
    feeds several layers takes the largest bits asked; one after a one-sided smooth activation takes
    the signedness of those bits (quant.mobile.after_smooth_signed, ``spec``'s conventions). Returns
    the layers no quantizer feeds."""
    import brevitas.nn as qnn

    from .mobile import _after_smooth, after_smooth_percentile, after_smooth_signed

    per_quantizer, orphans = {}, []
    for node in compute_nodes(gm):
        if wanted.get(node.target) is None:
            continue
        q = input_quantizer(gm, node)
        if q is None:
            orphans.append(node.target)
            continue
        old = per_quantizer.get(q.target, (None, 0))[1]
        per_quantizer[q.target] = (q, max(old, wanted[node.target]))
    for target, (q, bits) in per_quantizer.items():
        m = gm.get_submodule(target)
        if act_bits_of(m) == bits:
            continue
        smooth = bool(q.args) and _after_smooth(gm, q.args[0])
        pct = after_smooth_percentile(bits) if smooth else None
        signed = after_smooth_signed(spec, bits, m.act_quant.is_signed) if smooth else bool(m.act_quant.is_signed)
        cls = qnn.QuantReLU if isinstance(m, qnn.QuantReLU) else qnn.QuantIdentity
        gm.add_submodule(target, cls(act_quant=act_quant(bits, signed, pct),
                                     return_quant_tensor=m.return_quant_tensor))
    return orphans


def table(gm) -> list[dict]:
    """Per Conv / Linear layer of quantized ``gm``, in graph order: name, type, weight bits and the
    bits of the activations it reads (None: no single quantizer in front of it)."""
    rows = []
    for node in compute_nodes(gm):
        m = gm.get_submodule(node.target)
        q = input_quantizer(gm, node)
        rows.append({"name": node.target, "type": layer_type(m), "weight_bits": int(m.weight_quant.bit_width()),
                     "act_bits": act_bits_of(gm.get_submodule(q.target)) if q is not None else None,
                     "act_quant": q.target if q is not None else None})
    return rows


def record(qmodel, log=None) -> dict:
    """What a run records of quantized ``qmodel``'s per-layer bits (recipe.json, the manifest): the
    rules as ``--layer-bits`` takes them and every Conv / Linear layer's resolved bits. ``log`` gets a
    warning for layers asked act bits that no single quantizer in front of them could take."""
    orphans = getattr(qmodel, "edgekd_act_orphans", [])
    if orphans and log is not None:
        log(f"warning: --layer-bits asked activation bits for {', '.join(orphans[:5])}, whose input no single "
            "quantizer produces; their activation bits are unchanged")
    return {"layer_bits": qmodel.edgekd_spec.layer_rules_text, "layers": table(qmodel)}
