"""Pre-flight: what a target will not accept or not accelerate at given bit widths, before training."""

from __future__ import annotations

from ..config import options as op
from ..core.errors import ConfigError, IncompatibleError
from .loading import list_targets, load_target
from .schema import Target, bits_text

LEVELS = ("error", "warning", "info")


def _finding(level: str, code: str, message: str, suggestion: str = "") -> dict:
    return {"level": level, "code": code, "message": message, "suggestion": suggestion}


def _targets_accepting(weight_bits: int, act_bits: int, accelerated: bool) -> list[str]:
    names = []
    for t in list_targets():
        w = t.accelerated("weight") if accelerated else t.weight_bits
        a = t.accelerated("act") if accelerated else t.act_bits
        if weight_bits in w and act_bits in a:
            names.append(t.name)
    return names


def _bits_findings(t: Target, kind: str, bits: int, other: int) -> list[dict]:
    label, option = ("weights", "--weight-bits") if kind == "weight" else ("activations", "--act-bits")
    accepted, fast = getattr(t, f"{kind}_bits"), t.accelerated(kind)
    pair = (bits, other) if kind == "weight" else (other, bits)
    if bits not in accepted:
        alt = _targets_accepting(*pair, accelerated=True) or _targets_accepting(*pair, accelerated=False)
        nearest = min((b for b in accepted if b >= bits), default=max(accepted))
        return [_finding("error", f"{kind}_bits_not_accepted",
                         f"{t.name} does not accept {bits}-bit {label} (it accepts {bits_text(accepted)})",
                         f"use {option} {nearest}" + (f", or target {' / '.join(alt)}" if alt else ""))]
    if bits not in fast:
        runs_at = min((b for b in fast if b >= bits), default=max(fast))
        alt = _targets_accepting(*pair, accelerated=True)
        why = ("they are stored on the int8 grid, so the model is no smaller and no faster than at 8 bits"
               if kind == "weight" else
               f"they cost accuracy and give no speed-up over {runs_at}-bit activations")
        return [_finding("warning", f"{kind}_bits_not_accelerated",
                         f"{t.name} accepts {bits}-bit {label} but computes them with {runs_at}-bit kernels: {why}",
                         f"use {option} {runs_at} for this target"
                         + (f", or target {' / '.join(alt)} to gain from {bits} bits" if alt else ""))]
    return []


def _convention_findings(t: Target, weight_bits: int, act_bits: int) -> list[dict]:
    q, out = t.quant, []
    if q.act_after_relu == "signed":
        out.append(_finding("info", "signed_act_after_relu",
                            f"{t.name} quantizes activations after ReLU as signed with zero point 0: the negative "
                            f"half of the range is unused, so post-ReLU activations keep {act_bits - 1} effective bits",
                            f"distill with --target {t.name} so QAT trains with this quantizer"))
    if q.scale_type == "po2":
        out.append(_finding("info", "po2_scales", f"{t.name} needs power-of-two scales; expect slightly lower "
                            "accuracy than float scales", f"distill with --target {t.name} so QAT learns po2 scales"))
    if q.weight_scaling == "per_tensor":
        out.append(_finding("info", "per_tensor_weights", f"{t.name} uses one weight scale per tensor, which costs "
                            "accuracy at low bit widths compared with per-channel scales", ""))
    if q.bias == "float":
        out.append(_finding("info", "float_bias", f"{t.name} keeps biases in float (not quantized to int32)", ""))
    if q.first_last_bits != op.SAME and q.first_last_bits > min(weight_bits, act_bits):
        out.append(_finding("info", "first_last_bits", f"first and last layers stay at {q.first_last_bits} bits "
                            f"on {t.name}; the W{weight_bits}A{act_bits} setting applies to the layers between", ""))
    return out


def _rule_findings(t: Target, rules) -> list[dict]:
    """Per-layer rules (quant.layerbits.LayerRule) whose widths ``t`` does not accept."""
    out = []
    for r in rules:
        for kind, bits, label in (("weight", r.weight, "weights"), ("act", r.act, "activations")):
            accepted = getattr(t, f"{kind}_bits")
            if bits is not None and bits not in accepted:
                nearest = min((b for b in accepted if b >= bits), default=max(accepted))
                out.append(_finding("error", f"layer_{kind}_bits_not_accepted",
                                    f"{t.name} does not accept {bits}-bit {label}, asked by --layer-bits {r.text} "
                                    f"(it accepts {bits_text(accepted)})",
                                    f"use {nearest} bits in that rule"))
    return out


def _mixed_finding(t: Target, weight_bits: int, act_bits: int, rules) -> dict:
    """Which of the widths a mixed-precision student uses ``t`` accepts and accelerates."""
    used = {"weight": {weight_bits} | {r.weight for r in rules if r.weight},
            "act": {act_bits} | {r.act for r in rules if r.act}}
    if t.quant.first_last_bits != op.SAME:
        used["weight"].add(t.quant.first_last_bits)
    parts = []
    for kind, label in (("weight", "weights"), ("act", "activations")):
        fast = sorted(b for b in used[kind] if b in t.accelerated(kind))
        slow = sorted(b for b in used[kind] if b in getattr(t, f"{kind}_bits") and b not in t.accelerated(kind))
        parts.append(f"{label} at {bits_text(used[kind])} bits: accelerated {bits_text(fast) or 'none'}"
                     + (f"; {bits_text(slow)} run on {bits_text(t.accelerated(kind))}-bit kernels" if slow else ""))
    return _finding("info", "mixed_bits", f"{t.name} takes a width per layer (each layer has its own quantizers); "
                    + "; ".join(parts), "")


def preflight(target: Target | str, weight_bits: int, act_bits: int, layer_bits=()) -> list[dict]:
    """Before training: what `target` will not accept or not accelerate at these bit widths, and
    with per-layer rules (``layer_bits``: quant.layerbits rules or --layer-bits strings), which of
    the mixed widths it accepts and accelerates.

    Returns findings {level: error|warning|info, code, message, suggestion}, errors first.
    Based on the target's declared bits and conventions only (no model is inspected).
    """
    from ..config.layerbits import rules_from

    t = load_target(target) if isinstance(target, str) else target
    rules = rules_from(layer_bits)
    findings = []
    for kind, bits in (("weight", weight_bits), ("act", act_bits)):
        try:
            op.check(f"{kind}_bits", bits)
        except ConfigError as e:
            findings.append(_finding("error", f"{kind}_bits_out_of_range", e.message,
                                     f"edgekd trains {op.MIN_BITS}- to {op.MAX_BITS}-bit students"))
    if not findings:
        findings += _bits_findings(t, "weight", weight_bits, act_bits)
        findings += _bits_findings(t, "act", act_bits, weight_bits)
        findings += _convention_findings(t, weight_bits, act_bits)
        if rules:
            findings += _rule_findings(t, rules) + [_mixed_finding(t, weight_bits, act_bits, rules)]
    return sorted(findings, key=lambda f: LEVELS.index(f["level"]))


def require_deployable(target: Target | str, weight_bits: int, act_bits: int, layer_bits=()) -> list[dict]:
    """preflight, raising one IncompatibleError that lists every error; returns the other findings."""
    findings = preflight(target, weight_bits, act_bits, layer_bits)
    errors = [f for f in findings if f["level"] == "error"]
    if errors:
        name = target if isinstance(target, str) else target.name
        raise IncompatibleError(f"W{weight_bits}A{act_bits} cannot be deployed to {name}: "
                                + "; ".join(f["message"] for f in errors),
                                "; ".join(f["suggestion"] for f in errors if f["suggestion"]) or None)
    return findings
