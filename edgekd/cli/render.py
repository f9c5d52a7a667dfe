"""The catalog as text: tables of targets and profiles, one entry in detail, pre-flight findings.

Functions return lines (strings); the CLI prints them. Bench rows are rendered by edgekd.bench.report.
Every value from a catalog file (names, aliases, descriptions, hardware facts) goes through
``core.text.clean``: a newline or an escape sequence in a user's .toml cannot forge a line.
"""

from __future__ import annotations

import dataclasses
import json

from ..catalog import Profile, Target, bits_text
from ..core.text import clean


def as_json(value) -> str:
    return json.dumps(value, indent=2)


def text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return clean(", ".join(map(str, value))) or "-"
    return "-" if value in ("", None) else clean(value)


def table(rows: list[dict], columns: list[tuple[str, str]], width: int | None = None) -> list[str]:
    """Rows as aligned columns; with a terminal ``width`` the last column is cut to fit."""
    cells = [[text(r[key]) for key, _ in columns] for r in rows]
    heads = [head for _, head in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    room = max(20, width - sum(widths[:-1]) - 2 * (len(widths) - 1)) if width else 10**6
    lines = []
    for line in [heads] + cells:
        last = line[-1] if len(line[-1]) <= room else line[-1][: room - 3] + "..."
        lines.append("  ".join(c.ljust(w) for c, w in zip(line[:-1], widths)) + "  " + last)
    return lines


def tree(mapping: dict, indent: int = 2, notes: dict | None = None) -> list[str]:
    """A nested mapping as indented 'key  value' lines (notes: key -> trailing comment)."""
    width = max((len(k) for k in mapping), default=0)
    value_width = max((len(text(v)) for v in mapping.values() if not isinstance(v, dict)), default=0)
    lines = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            lines.append(" " * indent + clean(key))
            lines += tree(value, indent + 2)
            continue
        line = " " * indent + clean(key).ljust(width) + "  " + text(value)
        if notes and key in notes:
            line = line.ljust(indent + width + 2 + value_width) + f"  # {clean(notes[key])}"
        lines.append(line)
    return lines


TARGET_COLUMNS = [("name", "NAME"), ("aliases", "ALIASES"), ("backend", "BACKEND"), ("flavour", "FLAVOUR"),
                  ("weight_bits", "W BITS"), ("act_bits", "A BITS"), ("accelerated", "ACCELERATED"),
                  ("description", "DESCRIPTION")]
PROFILE_COLUMNS = [("name", "NAME"), ("aliases", "ALIASES"), ("cpu", "CPU"), ("memory_gb", "MEM GB"),
                   ("accelerator", "ACCELERATOR"), ("targets", "TARGETS")]


def target_detail(t: Target, via: str) -> list[str]:
    """``edgekd targets show``: one target, with its backend's help for each option."""
    from ..backends import get_backend

    lines = [clean(f"{t.name}  {t.description}")]
    if via.startswith("profile:"):
        lines.append(clean(f"  (preferred target of profile {via.split(':', 1)[1]})"))
    tol = f"top-1 agreement >= {t.tolerance.min_top1_agreement}" + (
        f", |logit diff| <= {t.tolerance.max_abs_diff}" if t.tolerance.max_abs_diff is not None else "")
    lines += tree({"file": t.path, "aliases": list(t.aliases), "backend": t.backend, "flavour": t.flavour,
                   "opset": t.opset,
                   "weight bits": f"accepts {bits_text(t.weight_bits)}, accelerated {bits_text(t.accelerated('weight'))}",
                   "act bits": f"accepts {bits_text(t.act_bits)}, accelerated {bits_text(t.accelerated('act'))}",
                   "tolerance": tol})
    q = dataclasses.asdict(t.quant)
    q["first_last_bits"] = "same as the rest" if q["first_last_bits"] == "same" else q["first_last_bits"]
    lines += ["  quant"] + tree(q, indent=4) + ["  options"]
    helps = {k: o.help for k, o in get_backend(t.backend).options.items()}
    return lines + tree(t.options, indent=4, notes=helps)


def profile_detail(p: Profile) -> list[str]:
    """``edgekd profiles show``: one device profile."""
    lines = [clean(f"{p.name}  {p.description}")]
    lines += tree({"file": p.path, "aliases": list(p.aliases), "targets": list(p.targets)})
    lines += ["  hardware"] + tree({k: v for k, v in p.hardware.items() if k != "sources"}, indent=4)
    lines += ["  bench"] + tree(dataclasses.asdict(p.bench), indent=4)
    lines += ["  budgets"] + tree({k: v for k, v in dataclasses.asdict(p.budgets).items() if v is not None}, indent=4)
    if p.hardware.get("sources"):
        lines += ["  sources"] + [f"    - {clean(source)}" for source in p.hardware["sources"]]
    return lines


def findings(t: Target, w: int, a: int, found: list[dict]) -> list[str]:
    """``edgekd check``: the pre-flight findings, then a count or the all-clear."""
    lines = [clean(f"check W{w}A{a} on {t.name} ({t.backend}, {t.flavour})")]
    for f in found:
        lines.append(f"  {f['level']:<8} {clean(f['message'])}")
        if f["suggestion"]:
            lines.append(f"  {'':<8} -> {clean(f['suggestion'])}")
    counts = {level: sum(f["level"] == level for f in found) for level in ("error", "warning", "info")}
    if not found:
        lines.append(f"  ok: W{w}A{a} is accepted and accelerated by {t.name}")
    else:
        lines.append("  " + ", ".join(f"{n} {level}{'s' * (n != 1 and level != 'info')}" for level, n in counts.items()))
    return lines


def target_summary(t: Target) -> dict:
    return {"name": t.name, "aliases": list(t.aliases), "backend": t.backend, "flavour": t.flavour,
            "weight_bits": bits_text(t.weight_bits), "act_bits": bits_text(t.act_bits),
            "accelerated": f"W{bits_text(t.accelerated('weight'))} A{bits_text(t.accelerated('act'))}",
            "min_top1_agreement": t.tolerance.min_top1_agreement, "description": t.description}


def profile_summary(p: Profile) -> dict:
    hw = p.hardware
    cpu = hw.get("cpu", {})
    model = str(cpu.get("model", "?")).removeprefix("Arm ")
    cpu_text = f"{cpu.get('cores', '?')}x {model}" if cpu else hw.get("arch", "")
    return {"name": p.name, "aliases": list(p.aliases), "arch": hw.get("arch", ""), "cpu": cpu_text,
            "memory_gb": hw.get("memory_gb", ""),
            "accelerator": _accelerator_text(hw.get("accelerator", {}), hw.get("fpga", {})),
            "targets": list(p.targets), "description": p.description}


def _accelerator_text(acc: dict, fpga: dict) -> str:
    if fpga:
        return f"FPGA {fpga.get('lut', 0) // 1000}K LUT, {fpga.get('dsp', '?')} DSP"
    if not acc or acc.get("kind", "none") == "none":
        return "none"
    text = f"{acc['kind'].upper()}" + (f" {acc['cuda_cores']} cores" if "cuda_cores" in acc else "")
    text += f" + {acc['dla_cores']} DLA" if acc.get("dla_cores") else ""
    tops = acc.get("int8_tops_sparse") or acc.get("int8_tops_dense")
    return text + (f", {tops} INT8 TOPS" if tops else "")
