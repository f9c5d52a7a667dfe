"""``edgekd export`` (a run -> a bundle for a target) and ``edgekd compile`` (on the device)."""

from __future__ import annotations

from pathlib import Path

import click

from . import common as c
from .app import main


@main.command()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@c.flag("target", help="Target name, alias or .toml file.")
@c.out_option("--out", help="Bundle directory (default bundles/RUN-TARGET).")
@c.overwrite_opt
@click.option("--student", metavar="SPEC",
              help="The student's architecture, named again: needed when the run's student came from "
                   "module:callable (the checkpoint's name for it is not run without --student or --trust-code).")
@c.trust_code_opt
@click.option("--float", "float_model", is_flag=True,
              help="Export the run's float student (float.pt) unquantized (fp32): the reference whose speed and "
                   "accuracy a quantized bundle is compared with.")
@c.flag("eval_samples")
@c.quiet_opt
def export(run_dir, target, out, overwrite, student, trust_code, float_model, eval_samples, quiet):
    """Export a distilled student for a target, compile it and check it against PyTorch."""
    from ..api import export as run_export

    m = run_export(run_dir, target, out=out, log=c.logger(quiet), overwrite=overwrite, student=student,
                   trust_code=trust_code, float_model=float_model, eval_samples=eval_samples)
    p = m["parity"]
    fusion = m.get("fusion") or {}
    fused = f"  float compute nodes left: {fusion['float_compute']}" if "float_compute" in fusion else ""
    if m.get("test_samples", 0) > p["n"]:
        fused += f"  whole test split ({m['test_samples']} images): runtime accuracy {m['runtime_accuracy_full']:.4f}"
    click.echo(f"bundle: {m['bundle_dir']}  {m['format']} for {m['target']}  runtime accuracy "
               f"{m['runtime_accuracy']:.4f} (torch {m['torch_accuracy']:.4f})  parity: top-1 agreement "
               f"{p['top1_agreement']:.4f} on {p['n']} samples, max abs diff {p['max_abs_diff']:.3g}{fused}")


@main.command("compile")
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--profile", metavar="NAME|FILE.toml",
              help="Device profile: DLA cores and the batch sizes the engine's profile must cover.")
@c.quiet_opt
def compile_command(bundle, profile, quiet):
    """Build a bundle's TensorRT engine on this device (a Jetson or a machine with an NVIDIA GPU).

    Runs where the engine will run: engines do not move between GPUs or TensorRT versions.
    Needs TensorRT's Python bindings and cuda-python (pip install 'edgekd[tensorrt]'; on a
    Jetson, TensorRT comes with JetPack), never torch. Checks the engine against the PyTorch
    logits saved at export and updates the manifest (compiled: true, model_file: model.engine).
    """
    from ..pipeline.deploy import compile_bundle  # not ..api, which imports torch: compile runs without it

    m = compile_bundle(bundle, profile, log=c.logger(quiet))
    p, layers = m["engine_parity"], m["engine"]["layers"]
    click.echo(f"engine: {Path(m['bundle_dir']) / m['model_file']}  TensorRT {m['engine']['trt_version']} on "
               f"{m['engine']['device']}  int8 layers {len(layers['int8_layers'])}/{layers['layers']}  parity: top-1 "
               f"agreement {p['top1_agreement']:.4f} on {p['n']} samples, max abs diff {p['max_abs_diff']:.3g}")
