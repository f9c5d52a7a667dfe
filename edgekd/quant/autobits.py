"""Per-layer weight bits chosen automatically (``distill --bits auto --budget size=SIZE``, config.budget).

1. Sizes, planned before any training (``plan``): a Conv / Linear layer's weights packed at b bits
   take ceil(parameters x b / 8) bytes. Layers whose bits are fixed (the first and last layers at
   --first-last-bits unless it is 'same'; layers a --layer-bits rule gives weight bits) count at
   those bits; every other layer gets one of the widths the target accepts (``widths``). A budget
   below the smallest total is an error before training; one at or above the widest total keeps the
   widest width everywhere (said; nothing measured).
2. Sensitivity, after the float phase, on AUTO_SAMPLES validation images (then training images):
   per free layer and width, the float student with only that layer's weights quantized at that
   width (quant.sensitivity.weight_noise): the error power at the logits relative to the signal,
   n = 10^(-SQNR/10). Activations stay in float there: they keep --act-bits whatever the choice.
3. Choice (``assign``): the widths minimising the sum of n under the budget, an exact
   multiple-choice knapsack solved by dynamic programming over bytes. Summing the layers' noise
   powers assumes their errors add independently at the logits, the first-order model that
   mixed-precision searches use (ZeroQ's Pareto frontier, HAWQ-V3's integer program); the sum is
   recorded as a predicted SQNR. Large budgets coarsen the byte axis to at most MAX_STEPS steps,
   rounding every size up, so the choice never exceeds the budget (recorded ``exact``: false).
4. QAT then runs with the choice as --layer-bits rules (``chosen_spec``): the narrowest chosen width
   becomes the weight bits, and one rule per wider width names its layers by module path, so export,
   explain and a retrain rebuild it as any --layer-bits run. ``AutoBits.record`` (recipe.json's
   ``auto_bits``, and the log) holds per layer its bits, bytes and sensitivity, the budget and the
   size reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from math import gcd

from ..config import options as op
from ..config.budget import Budget, human
from ..config.layerbits import LayerRule, escape
from ..core.errors import ConfigError

AUTO_SAMPLES = 256  # images the sensitivities are measured on
MAX_STEPS = 1 << 18  # capacity steps of the knapsack; beyond, bytes are grouped (sizes rounded up)
UNMEASURABLE = 1e30  # the cost of a width whose error is not finite (a NaN or inf logit): last resort


def packed_bytes(params: int, bits: int) -> int:
    """Bytes of ``params`` weights packed at ``bits`` each: ceil(params x bits / 8)."""
    return -(-params * bits // 8)


@dataclass(frozen=True)
class Layer:
    """A Conv / Linear layer: module path, type, weight parameters, and its fixed bits (None: chosen)."""

    name: str
    type: str
    params: int
    fixed: int | None = None

    def nbytes(self, bits: int) -> int:
        return packed_bytes(self.params, bits)


def widths(target) -> tuple[int, ...]:
    """The weight widths ``target`` accepts, at most 7 under reduce_range (as spec_for_target caps them)."""
    cap = 7 if getattr(target.quant, "reduce_range", False) else op.MAX_BITS
    return tuple(sorted({min(b, cap) for b in target.weight_bits}))


def layers_of(model, spec) -> list[Layer]:
    """The Conv / Linear layers of float ``model`` in graph order, with the bits ``spec`` fixes."""
    from . import brevitas, layerbits

    found = layerbits.compute_layers(brevitas.trace(model))
    ends = brevitas._first_last(found, spec.first_last_by) if spec.first_last_bits != op.SAME else []
    rules = tuple(r for r in spec.layer_bits if r.weight)
    fixed = layerbits.resolve(found, rules, None, {p: spec.first_last_weight_bits for p in ends})
    return [Layer(p, layerbits.layer_type(m), int(m.weight.numel()), fixed[p]["weight"]) for p, m in found]


def total(layers: list[Layer], bits: dict[str, int]) -> int:
    """Bytes of the weights packed at their bits (fixed, else ``bits``)."""
    return sum(layer.nbytes(layer.fixed or bits[layer.name]) for layer in layers)


def assign(options: list[list[tuple[int, float]]], capacity: int) -> tuple[list[int], bool]:
    """A multiple-choice knapsack: ``options`` per group (layer) a list of (size, cost); one option
    per group, total size <= ``capacity``, least total cost. Returns the option index per group and
    whether the solution is exact (False: bytes grouped into at most MAX_STEPS steps, sizes rounded
    up). Ties go to the earlier option. ValueError when nothing fits."""
    import numpy as np

    unit = 0
    for group in options:
        for size, _ in group:
            unit = gcd(unit, int(size))
    unit = max(unit, 1)
    exact = capacity // unit <= MAX_STEPS
    if not exact:
        unit = -(-capacity // MAX_STEPS)
    steps = capacity // unit
    sizes = [[-(-int(s) // unit) for s, _ in group] for group in options]
    best = np.zeros(steps + 1)
    choice = np.zeros((len(options), steps + 1), dtype=np.int8)
    for g, group in enumerate(options):
        new = np.full(steps + 1, np.inf)
        for k, ((_, cost), s) in enumerate(zip(group, sizes[g])):
            if s > steps:
                continue
            cand = np.full(steps + 1, np.inf)
            cand[s:] = best[:steps + 1 - s] + (cost if math.isfinite(cost) else UNMEASURABLE)
            better = cand < new
            new[better], choice[g, better] = cand[better], k
        best = new
    if not np.isfinite(best[steps]):
        raise ValueError(f"no choice fits in {capacity}")
    picks, c = [], steps
    for g in reversed(range(len(options))):
        k = int(choice[g, c])
        picks.append(k)
        c -= sizes[g][k]
    return picks[::-1], exact


def chosen_spec(spec, bits: dict[str, int]):
    """``spec`` with ``bits`` (module path -> weight bits): the narrowest becomes the weight bits and
    one rule per wider width names its layers, before ``spec``'s own rules (which fix other layers)."""
    base = min(bits.values(), default=spec.weight_bits)
    wider: dict[int, list[str]] = {}
    for name, b in bits.items():
        if b != base:
            wider.setdefault(b, []).append(escape(name))
    rules = tuple(LayerRule(layers=tuple(names), weight=b) for b, names in sorted(wider.items()))
    return replace(spec, weight_bits=base, layer_bits=(*rules, *spec.layer_bits))


def samples(data, n: int = AUTO_SAMPLES):
    """The first ``n`` validation images, topped up with training images (preprocessed, as evaluated)."""
    import numpy as np
    import torch

    parts, left = [], n
    for split in (getattr(data, "val", None), data.train):
        k = min(left, len(split)) if split is not None else 0
        if k:
            parts.append(np.asarray(split.take(range(k)), dtype=np.float32))
            left -= k
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(parts)))


def _db(noise: float | None) -> float | None:
    """A relative noise power as SQNR in dB (None: exact; -inf, written as null: not finite)."""
    if noise is None or noise == 0:
        return None
    return -10.0 * math.log10(noise) if math.isfinite(noise) else -math.inf


@dataclass
class AutoBits:
    """What ``--bits auto`` planned before training (``plan``); ``choose`` runs after the float phase."""

    budget: Budget
    layers: list[Layer]
    widths: tuple[int, ...]
    act_bits: int
    epochs: int | None = None  # QAT epochs given (None: op.qat_epochs of the chosen bits)
    qat_temperature: float | None = None  # the QAT temperature given (None: op.qat_temperature of them)
    samples: int = AUTO_SAMPLES
    record: dict | None = None  # the choice, once made (recipe.json: auto_bits)
    int8_target: str | None = None  # a target whose export stores every weight as int8 (flavour qdq)

    @property
    def free(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.fixed is None]

    def size_at(self, bits: int) -> int:
        """Bytes with every chosen layer at ``bits`` (fixed layers at theirs)."""
        return total(self.layers, {layer.name: bits for layer in self.free})

    @property
    def ample(self) -> bool:
        """The budget holds every layer at the widest width: nothing to choose."""
        return self.size_at(self.widths[-1]) <= self.budget.size_bytes

    def notes(self) -> list[str]:
        """What the plan says before training (the log)."""
        lo, hi, wide = self.size_at(self.widths[0]), self.size_at(self.widths[-1]), self.widths[-1]
        line = (f"auto bits: {self.budget.label}: {human(self.budget.size_bytes)} of weights packed at their bit "
                f"widths; {len(self.free)} of {len(self.layers)} layers chosen among W{','.join(map(str, self.widths))}"
                f" ({human(lo)} all at W{self.widths[0]}, {human(hi)} all at W{wide})")
        line += (f"; the budget holds every layer at W{wide}: all keep W{wide}, nothing to choose" if self.ample
                 else "; chosen after the float phase from each layer's measured sensitivity")
        if self.int8_target:
            return [line, f"auto bits: note: {self.int8_target} stores every weight as int8 (qdq), so its model.onnx "
                          "does not shrink below 8 bits per weight; the packed size is what a bit-packed store holds"]
        return [line]

    def choose(self, run, student, spec):
        """The spec QAT trains with: ``spec`` with the widths chosen for float ``student`` (measured on
        ``run.data``), logged and kept in ``record``; ``run.opts`` gets the QAT epochs and temperature
        of the chosen bits where none were given."""
        from . import sensitivity

        noise, exact = None, True
        if self.ample:
            bits = {layer.name: self.widths[-1] for layer in self.free}
        else:
            x = samples(run.data, self.samples)
            run.log(f"auto bits: measuring {len(self.free)} layers at {len(self.widths)} widths on {len(x)} images")
            noise = sensitivity.weight_noise(student, spec, self.widths, [layer.name for layer in self.free], x)
            bits, exact = self._assign(noise)
        self.record = self._record(bits, noise, exact)
        for line in summary(self.record):
            run.log(line)
        low = min(r["bits"] for r in self.record["layers"])
        given = replace(run.opts, qat_temperature=self.qat_temperature)
        run.opts = replace(run.opts, epochs=op.qat_epochs(self.epochs, low, spec.act_bits),
                           qat_temperature=op.qat_temperature(given, low, spec.act_bits))
        return chosen_spec(spec, bits)

    def _assign(self, noise: dict) -> tuple[dict[str, int], bool]:
        fixed = total([layer for layer in self.layers if layer.fixed], {})
        wide_first = self.widths[::-1]  # ties keep the wider width
        options = [[(layer.nbytes(b), noise[layer.name][b]) for b in wide_first] for layer in self.free]
        picks, exact = assign(options, self.budget.size_bytes - fixed)
        return {layer.name: wide_first[k] for layer, k in zip(self.free, picks)}, exact

    def _record(self, bits: dict[str, int], noise: dict | None, exact: bool) -> dict:
        rows = []
        for layer in self.layers:
            b = layer.fixed or bits[layer.name]
            row = {"name": layer.name, "type": layer.type, "params": layer.params, "bits": b,
                   "bytes": layer.nbytes(b), "fixed": layer.fixed is not None}
            if noise is not None and layer.name in noise:
                row["chosen_db"] = _db(noise[layer.name][b])
                row["sensitivity_db"] = {str(w): _db(n) for w, n in sorted(noise[layer.name].items())}
            rows.append(row)
        predicted = sum(noise[name][b] for name, b in bits.items()) if noise is not None else None
        return {"budget": self.budget.to_dict(), "size_bytes": sum(r["bytes"] for r in rows),
                "smallest_bytes": self.size_at(self.widths[0]), "widest_bytes": self.size_at(self.widths[-1]),
                "widths": list(self.widths), "act_bits": self.act_bits, "measured": noise is not None,
                "stored_as_int8_by": self.int8_target,
                "samples": self.samples if noise is not None else 0, "exact": exact,
                "predicted_logits_sqnr_db": _db(predicted) if predicted is not None else None,
                "objective": "least sum over chosen layers of the logits' relative error power with that layer's "
                             "weights alone quantized (10^(-SQNR/10)), total packed weight bytes <= budget",
                "layers": rows}


def summary(record: dict) -> list[str]:
    """Log lines of a choice: the size reached against the budget, then one line per width."""
    budget, size = record["budget"], record["size_bytes"]
    db = record["predicted_logits_sqnr_db"]
    head = (f"auto bits: {human(size)} of {human(budget['size_bytes'])} ({budget['from']})"
            + (f", predicted logits SQNR {db:.1f} dB" if db is not None else "")
            + ("" if record["exact"] else " (sizes grouped: within the budget, near the optimum)"))
    by_bits: dict[int, list[str]] = {}
    for r in record["layers"]:
        by_bits.setdefault(r["bits"], []).append(r["name"] + ("*" if r["fixed"] else ""))
    lines = [head]
    for b, names in sorted(by_bits.items()):
        lines.append(f"auto bits: W{b}: {len(names)} layer{'s' * (len(names) != 1)}: {', '.join(names[:12])}"
                     + (f", ... ({len(names)} in all)" if len(names) > 12 else ""))
    if any(r["fixed"] for r in record["layers"]):
        lines.append("auto bits: (* fixed by --first-last-bits or --layer-bits)")
    return lines


def plan(model, spec, target, budget: Budget, opts) -> AutoBits:
    """The plan of ``--bits auto`` for float ``model`` quantized as ``spec`` for ``target``; a budget
    the smallest widths cannot meet is one ConfigError (before any training)."""
    auto = AutoBits(budget, layers_of(model, spec), widths(target), spec.act_bits, opts.epochs, opts.qat_temperature,
                    int8_target=target.name if target.flavour == "qdq" else None)
    low = auto.size_at(auto.widths[0])
    if low > budget.size_bytes:
        fixed = [layer for layer in auto.layers if layer.fixed]
        detail = (f", {len(fixed)} of them fixed by --first-last-bits or --layer-bits at "
                  f"{human(total(fixed, {}))}" if fixed else "")
        raise ConfigError(f"{budget.label} cannot be met: the student's {len(auto.layers)} Conv / Linear layers take "
                          f"at least {human(low)}{f' ({low} B)' if low >= 1000 else ''} with every chosen layer at W{auto.widths[0]}{detail}",
                          "raise the budget" + (", let --bits auto choose the first and last layers too with "
                                                "--first-last-bits same" if fixed else "")
                          + ", or choose a smaller --student")
    return auto


def from_options(opts, budget: Budget, student, spec, target, order: str, given_module: bool = False) -> AutoBits:
    """The plan of ``distill --bits auto`` (pipeline.distill): ``student`` an inputs.Student, ``order``
    the resolved order. The sensitivities are measured on a trained float student: a float phase, or
    weights it starts from (``given_module``: a module from the Python API, taken as trained)."""
    if opts.weight_bits != op.default("weight_bits"):
        raise ConfigError(f"--bits auto chooses the weight bits, and weight bits {opts.weight_bits} were also given",
                          "drop --weight-bits (weight_bits), or drop --bits auto")
    trained = (order == "float-first" and opts.float_epochs > 0) or student.weights is not None or given_module
    if not trained:
        raise ConfigError("--bits auto measures each layer's sensitivity on the trained float student, and this run "
                          "has none before QAT (no float phase, no weights)",
                          "give --float-epochs N > 0 (order float-first), or start from trained weights with "
                          "--student ARCH=FLOAT.pt")
    return plan(student.model, spec, target, budget, opts)
