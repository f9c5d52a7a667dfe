"""``edgekd explain``: which layer of a quantized student breaks (per-layer SQNR, worst first)."""

from __future__ import annotations

import json

import click

from . import common as c
from .app import main


def _db(value, compared: bool = True, unit: str = "") -> str:
    if not compared:
        return "-"
    return "exact" if value is None else f"{value:.1f}{unit}"


def _gain(r: dict) -> str:
    """The gain of raising a layer (or type) to float: '+3.2' dB, or 'exact' (the logits then equal float)."""
    return "exact" if r["raised_db"] is None else f"{r['gain_db']:+.1f}"


def _groups(result: dict) -> list[str]:
    """One line per layer type: what raising all its layers to float gains at the logits."""
    lg = result["logits"]
    lines = [f"per layer type, all its layers raised to float (from {_db(lg['probe_sqnr_db'], unit=' dB')} at the "
             f"logits, top-1 agreement {lg['probe_agreement']:.4f}, with every layer quantized and biases in float):"]
    for g in result["groups"]:
        lines.append(f"  {g['group']:<10} {len(g['layers']):>3} layer(s)  gain {_gain(g)} dB -> "
                     f"{_db(g['raised_db'], unit=' dB')}, top-1 agreement {g['raised_agreement']:.4f}; "
                     f"only they quantized: {_db(g['alone_db'], unit=' dB')}; {g['noise_share']:.0%} of the noise, "
                     f"raised for {g['raise_bytes']:,} B ({_per_kb(g)} per KiB)")
    return lines


def _per_kb(r: dict) -> str:
    return "-" if r["share_per_kb"] is None else f"{r['share_per_kb']:.1%}"


ORDER = {"gain": "most gained by raising first", "alone": "worst alone first",
         "bytes": "most noise removed per byte raised first"}


def render(result: dict) -> list[str]:
    """The table of ``explain``'s result, worst layer first, and a line on the logits."""
    rows = result["layers"]
    runtime = result["bundle_dir"] is not None and result["runtime_note"] is None
    head = ["layer", "type", "W", "A", "noise %", "raise B", "%/KiB", "raise gain dB", "logits dB", "layer dB",
            "weights dB", "inputs dB", "cumulative dB"] + (["runtime dB"] if runtime else [])
    body = [[r["name"], r["type"], str(r["weight_bits"]), str(r["act_bits"] or "-"), f"{r['noise_share']:.1%}",
             f"{r['raise_bytes']:,}", _per_kb(r), _gain(r), _db(r["logits_db"]),
             _db(r["isolated_db"]), _db(r["weights_db"]), _db(r["inputs_db"], r["act_bits"] is not None),
             _db(r["cumulative_db"])] + ([_db(r.get("runtime_db"), r.get("runtime_compared", False))]
                                         if runtime else []) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = [f"{result['source']}: W{result['weight_bits']}A{result['act_bits']}"
             + (f" with {', '.join(result['layer_bits'])}" if result["layer_bits"] else "")
             + f", {result['samples']} test samples; SQNR vs the float student (higher is better), "
             + ORDER[result["rank"]] + (" (--rank auto)" if result.get("rank_asked") == "auto" else "")]
    for row in [head, *body]:
        lines.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    lg = result["logits"]
    lines.append(f"logits: fake-quant vs float {_db(lg['sqnr_db'], unit=' dB')}, top-1 agreement "
                 f"{lg['top1_agreement']:.4f}"
                 + (f"; runtime vs fake-quant {_db(lg['runtime_sqnr_db'], unit=' dB')}" if "runtime_sqnr_db" in lg else ""))
    lines += _groups(result)
    lines.append(f"float reference: {result['reference']}")
    lines.append("noise %: the layer's share of the noise at the logits, each layer quantized alone; raise B: the "
                 "packed weight bytes raising it to the target's widest weights adds; %/KiB: the one per KiB of "
                 "the other. raise gain: at the logits, the whole model quantized but this layer (its weights and "
                 "its input quantizer) in float, against the whole model quantized: what more bits there buy; "
                 "logits / layer: SQNR at the logits / at the layer's output with only that layer quantized (its "
                 "weights and the activations it reads); weights / inputs: only one of them; cumulative: the whole "
                 "model quantized" + ("; runtime: the runtime vs fake-quant at the layer's requantized output"
                                      if runtime else ""))
    if result["runtime_note"]:
        lines.append(f"note: {result['runtime_note']}")
    if result.get("caveat"):
        lines.append(f"caveat: {result['caveat']}")
    return lines


@main.command("explain")
@click.argument("source", required=False, type=c.InPath(), metavar="[BUNDLE|RUN]")
@click.option("--samples", default=500, show_default=True, type=c.INT,
              help="Test samples to measure on (a bundle's eval.npz, else a stratified sample of the test split).")
@click.option("--rank", type=click.Choice(["auto", "gain", "alone", "bytes"]), default="auto", show_default=True,
              help="Order the layers by what raising each to float gains (gain), by the error each makes "
                   "quantized alone (alone), or by its share of the noise per KiB its raise costs (bytes). "
                   "auto: gain, or bytes where the whole model quantized has collapsed (gains are noise there).")
@click.option("--run", "run_dir", type=c.InPath(), metavar="DIR",
              help="The run a bundle was exported from, when it is no longer where the manifest says.")
@click.option("--student", metavar="ARCH", help="The student architecture, when the run's is module:callable.")
@c.trust_code_opt
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@c.out_option("--png", "png_path", metavar="FILE.png",
              help="Also plot the per-layer SQNR (needs: pip install 'edgekd[plot]').")
@c.overwrite_opt
@c.quiet_opt
def explain_command(source, samples, rank, run_dir, student, trust_code, as_json, png_path, overwrite, quiet):
    """Which layer breaks: per Conv / Linear layer, the error quantization adds, worst first.

    \b
    Per layer, as SQNR in dB against the float student (the same weights, quantizers off):
      raise gain  at the logits, the whole model quantized but this layer in float, over the
                  whole model quantized: what more bits for it buy (--rank gain; also per
                  layer type: every depthwise layer raised together, ...)
      noise %     its share of the noise at the logits, each layer quantized alone; with
                  raise B, the packed weight bytes its raise adds: --rank bytes ranks by
                  share per KiB, the best buy under a size budget first
      logits      at the logits, only this layer quantized (its weights and the activations
                  it reads): --rank alone, worst first
      layer       the same at the layer's output; weights / inputs: only one of the two
      cumulative  the whole model quantized: the error that has reached this layer
      runtime     (ONNX Runtime, QONNX bundles) the runtime against the fake-quant model at the
                  layer's requantized output; 'exact' where they agree bit for bit
    --rank auto (the default) is gain, or bytes where the whole model quantized has collapsed
    (top-1 agreement with float under 50%: gains over it are noise, the errors alone are not).
    Then try more bits where it is worst, e.g. edgekd distill --layer-bits depthwise=W8A8.
    """
    from ..pipeline.explain import explain, plot

    if png_path is not None:
        from ..bench.report import check_outputs, check_plot_available

        check_plot_available()
        check_outputs([p for p in (source, run_dir) if p is not None], overwrite, png=png_path)
    result = explain(source, samples, run_dir, student, trust_code, log=c.logger(quiet), rank=rank)
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        for line in render(result):
            click.echo(line)
    if png_path is not None:
        click.echo(f"wrote {plot(result, png_path)}", err=True)
