"""QuantSpec: everything needed to rebuild the same quantized model, from the requested bits and a
target's conventions (stored in every run's checkpoint)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import options as op


@dataclass(frozen=True)
class QuantSpec:
    """Everything needed to rebuild the same quantized model (stored in the run's checkpoint)."""

    weight_bits: int = 8
    act_bits: int = 8
    input_bits: int = 8
    first_last_bits: int | str = 8  # "same": first/last layers use weight_bits too
    weight_scaling: str = "per_channel"  # per_channel | per_tensor
    scale_type: str = "float"  # float | po2
    act_after_relu: str = "unsigned"  # unsigned | signed
    bias: str = "int32"  # int32 | float
    layer_bits: tuple = ()  # quant.layerbits.LayerRule per-layer overrides, in order (later wins)
    # how the first and last layers are found: "path" (the layers themselves); "shape" (runs written
    # before per-layer bits: layers of their type and weight shape, so that a depthwise layer shaped
    # like a grayscale stem kept the stem from 8 bits; reloaded as they were trained)
    first_last_by: str = "path"

    def __post_init__(self):
        from ..config.layerbits import rules_from

        for name in ("weight_bits", "act_bits", "input_bits"):
            op.check("bits" if name == "input_bits" else name, getattr(self, name), name.replace("_", "-"))
        # None: the spelling of "same" in checkpoints written before it had one
        object.__setattr__(self, "first_last_bits", op.check("first_last_bits", self.first_last_bits))
        object.__setattr__(self, "layer_bits", rules_from(self.layer_bits))
        if self.first_last_by not in ("path", "shape"):
            raise ValueError(f"first_last_by must be 'path' or 'shape', got {self.first_last_by!r}")

    def to_dict(self) -> dict:
        return asdict(self) | {"layer_bits": [r.to_dict() for r in self.layer_bits]}

    @property
    def label(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits}"

    @property
    def layer_rules_text(self) -> list[str]:
        """The per-layer rules as ``--layer-bits`` takes them (``depthwise=W8A8``)."""
        return [r.text for r in self.layer_bits]

    @property
    def first_last_weight_bits(self) -> int:
        return self.weight_bits if self.first_last_bits == op.SAME else self.first_last_bits


def spec_for_target(target, weight_bits: int, act_bits: int, first_last_bits="target", layer_bits=()) -> QuantSpec:
    """Combine requested bits (and per-layer rules, quant.layerbits) with the target's conventions
    (catalog.Conventions)."""
    from ..config.layerbits import capped, rules_from

    conv = target.quant
    flb = conv.first_last_bits if first_last_bits == "target" else first_last_bits
    flb = op.SAME if flb is None else flb
    rules = rules_from(layer_bits)
    if getattr(conv, "reduce_range", False):
        weight_bits, flb = min(weight_bits, 7), (min(flb, 7) if flb != op.SAME else flb)
        rules = capped(rules, 7)
    return QuantSpec(weight_bits=weight_bits, act_bits=act_bits, first_last_bits=flb,
                     weight_scaling=conv.weight_scaling, scale_type=conv.scale_type,
                     act_after_relu=conv.act_after_relu, bias=conv.bias, layer_bits=rules)
