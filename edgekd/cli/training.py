"""``edgekd train`` and ``edgekd distill``: parse, call the pipeline, print one summary line."""

from __future__ import annotations

import re
from pathlib import Path

import click

from ..config import options as op
from ..core.errors import EdgekdError
from . import common as c
from .app import main


@main.command()
@c.data_opt
@c.data_opts
@c.flag("arch")
@c.flag("epochs", default=op.default("teacher_epochs"), help="Epochs.")
@c.flag("teacher_lr", "--lr", help="Peak learning rate (one-cycle).")
@c.flag("teacher_batch_size", "--batch-size", help="Batch size (global, across processes).")
@c.flag("teacher_optimizer", "--optimizer", help="sgd (Nesterov momentum 0.9) or adamw; weight decay on weights only.")
@c.flag("label_smoothing")
@c.seed_opt
@c.out_option("--out", help="Output directory (default runs/teachers/NAME).")
@c.overwrite_opt
@c.training_opts
@c.quiet_opt
def train(data, arch, epochs, teacher_lr, teacher_batch_size, teacher_optimizer, label_smoothing, seed, out, overwrite,
          device, amp, resume, tensorboard, quiet, **read):
    """Train a float model to use as a teacher (SGD one-cycle, label smoothing: the measured teacher recipe).

    \b
    Start from a weights file with --arch ARCH=WEIGHTS, e.g.
      edgekd train --data imagefolder:photos --arch torchvision:resnet18=resnet18.pth --normalize imagenet
    """
    from ..api import TrainOptions, train as run_train
    from ..training.distributed import launched_rank

    opts = TrainOptions(data=data, arch=arch, epochs=epochs, lr=teacher_lr, batch_size=teacher_batch_size,
                        optimizer=teacher_optimizer, label_smoothing=label_smoothing, seed=seed,
                        progress=not quiet, device=device, amp=amp, **read)
    metrics = run_train(opts, out=out, log=c.logger(quiet), resume=resume, overwrite=overwrite, tensorboard=tensorboard)
    if launched_rank() != 0:  # torchrun: rank 0 reports
        return
    click.echo(f"teacher: {metrics['path']}  test accuracy {metrics['accuracy']:.4f}  "
               f"({metrics['params']:,} parameters, {metrics['seconds']:.0f}s)")


def _distill_options(f):
    """The options of ``distill`` (all but the common ones), from the options table."""
    for decorator in reversed([
        c.data_opt, c.data_opts,
        c.flag("bits", type=str, callback=_bits_or_auto, metavar="2..8|auto",
               help=op.OPTIONS["bits"].help + " auto: each layer's weight bits chosen by its measured sensitivity "
                    "under --budget (or --profile); activations at --act-bits (8 unless given)."),
        c.flag("budget"), c.flag("profile"), c.flag("weight_bits", default=None, show_default=False),
        c.flag("act_bits", default=None, show_default=False),
        click.option("--teacher", multiple=True, help=op.OPTIONS["teacher"].help),
        click.option("--teacher-weight", "teacher_weights", multiple=True, type=c.FLOAT,
                     help="Weight of each --teacher in the ensemble (repeat, same order) [default: equal]."),
        c.flag("teacher_mix"), c.flag("student"), c.flag("target"), c.flag("method"),
        click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
                     help="A hyper-parameter of --method, e.g. --param beta=8 for dkd, --param student=5 for fitnet "
                          "(repeatable; values are TOML: 8, 0.5, \"5\", [\"5\",\"8\"])."),
        click.option("--config", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.toml",
                     help=op.OPTIONS["config"].help + " Options given here that differ from their defaults override "
                          "the file."),
        c.flag("temperature", "-T"), c.flag("alpha"), c.flag("qat_temperature"), c.flag("scheme"), c.flag("order"),
        c.flag("epochs"), c.flag("float_epochs"), c.flag("teacher_epochs"), c.flag("generations"), c.flag("peers"),
        click.option("--assistant", "assistants", multiple=True, help=op.OPTIONS["assistants"].help),
        c.flag("assistant_epochs"),
        click.option("--bit-schedule", metavar="B,B,...", help=op.OPTIONS["bit_schedule"].help),
        click.option("--flip/--no-flip", default=None,
                     help="Random horizontal flips [default: the dataset's]. Off, the teacher's outputs are cached."),
        click.option("--no-cache", is_flag=True, help="Run the teacher on every batch even when its outputs "
                                                       "could be cached."),
        c.flag("lr"), c.flag("qat_lr"), c.flag("batch_size"), c.flag("train_limit"),
        click.option("--first-last-bits", default=str(op.default("first_last_bits")), show_default=True,
                     help=op.OPTIONS["first_last_bits"].help),
        c.layer_bits_opt,
        c.seed_opt,
        click.option("--force", is_flag=True, help=op.OPTIONS["force"].help + " Without it such a run stops "
                     "before training, naming the likely causes (normalization, class order, image size)."),
        c.out_option("--out", help="Run directory (default runs/NAME)."), c.overwrite_opt, c.trust_code_opt,
        click.option("--list-layers", is_flag=True, help="Print the layer names feature terms can use, and exit."),
        c.training_opts, c.quiet_opt]):
        f = decorator(f)
    return f


def _bits_or_auto(ctx, param, value):
    """distill --bits: an integer from the table's range, or auto (quant.autobits)."""
    if value is None or value == "auto":
        return value
    if not re.fullmatch(r"[0-9]{1,3}", value):
        raise EdgekdError(f"--bits must be an integer between {op.MIN_BITS} and {op.MAX_BITS} or 'auto', got "
                          f"{op.shown(value)}")
    return op.check("bits", int(value), "--bits")


@main.command()
@_distill_options
def distill(bits, weight_bits, act_bits, teacher, teacher_weights, params, first_last_bits, layer_bits, bit_schedule,
            assistants, no_cache, out, overwrite, trust_code, list_layers, resume, tensorboard, quiet, **kw):
    """Train a quantized student by knowledge distillation (Brevitas QAT at 2..8 bits).

    \b
    Examples:
      edgekd distill --bits 4 --method dkd --param beta=8
      edgekd distill --bits 4 --method fitnet --param 'student=["8"]' --param 'teacher=["5.relu"]'
      edgekd distill --bits 2 --scheme progressive
      edgekd distill --bits auto --budget size=20KB
      edgekd distill --config recipe.toml
    """
    from ..api import DistillOptions, distill as run_distill
    from ..training.distributed import launched_rank

    if bits == "auto" and weight_bits is not None:
        raise EdgekdError("--bits auto chooses the weight bits; --weight-bits cannot also set them",
                          "drop --weight-bits, or give --bits 2..8")
    w, a = c.bits(op.default("weight_bits") if bits == "auto" else bits, weight_bits, act_bits)
    teachers = list(teacher)
    config = kw.pop("config")
    opts = DistillOptions(**kw, teacher=teachers[0] if len(teachers) == 1 else (teachers or None), weight_bits=w,
                          act_bits=a, params=c.params(params), config=str(config) if config else None,
                          teacher_weights=op.check("teacher_weights", list(teacher_weights) or None, "--teacher-weight"),
                          assistants=list(assistants) or ["resnet-student"], bit_schedule=c.bit_list(bit_schedule),
                          cache=not no_cache, first_last_bits=c.first_last_bits(first_last_bits),
                          layer_bits=list(layer_bits) or None, auto_bits=bits == "auto", progress=not quiet)
    if list_layers:
        return _print_layers(opts, trust_code)
    m = run_distill(opts, out=out, log=c.logger(quiet), resume=resume, overwrite=overwrite, trust_code=trust_code, tensorboard=tensorboard)
    if launched_rank() != 0:  # torchrun: rank 0 reports
        return
    teacher_acc = f"{m['teacher_accuracy']:.4f}" if m["teacher_accuracy"] is not None else "-"
    click.echo(f"run: {m['run_dir']}  W{m['weight_bits']}A{m['act_bits']} student accuracy {m['student_accuracy']:.4f} "
               f"(fake-quant, PyTorch, test split)  teacher {teacher_acc}  {m['seconds']:.0f}s")


def _print_layers(opts, trust_code: bool = False) -> None:
    from ..api import list_layers as layers

    listing = layers(opts, trust_code)
    for role in ("student", "teacher"):
        click.echo(f"{role} layers:")
        for r in listing[role]:
            click.echo(f"  {r['name']:<24} {r['type']:<20} {tuple(r['shape'])}")
    for text in listing["unmatched_rules"]:
        click.echo(f"note: --layer-bits pattern {op.shown(text)} matches no Conv or Linear layer of the student")


@main.command()
@click.argument("source", type=click.Path(path_type=Path), metavar="RUN|MODEL")
@c.flag("bits")
@c.flag("weight_bits", default=None, show_default=False)
@c.flag("act_bits", default=None, show_default=False)
@c.flag("target")
@click.option("--first-last-bits", default=str(op.default("first_last_bits")), show_default=True,
              help=op.OPTIONS["first_last_bits"].help)
@c.layer_bits_opt
@c.flag("calib_samples")
@click.option("--no-bias-correction", is_flag=True, help="Skip Brevitas's bias correction after calibration.")
@c.seed_opt
@c.out_option("--out", help="Run directory (default runs/DATA-ARCH-WxAy-ptq).")
@c.overwrite_opt
@c.trust_code_opt
@c.quiet_opt
def quantize(source, bits, weight_bits, act_bits, target, first_last_bits, layer_bits, calib_samples,
             no_bias_correction, seed, out, overwrite, trust_code, quiet):
    """Post-training quantization: a trained float model -> a quantized run that export takes.

    RUN|MODEL: a distill run (its float student, float.pt), a directory written by 'edgekd train',
    or an edgekd checkpoint file. Activation ranges are calibrated on training images and biases
    corrected (Brevitas); nothing is trained. The baseline QAT and distillation are measured against.
    """
    from ..pipeline.quantize import QuantizeOptions, quantize as run_quantize

    w, a = c.bits(bits, weight_bits, act_bits)
    opts = QuantizeOptions(weight_bits=w, act_bits=a, target=target, first_last_bits=c.first_last_bits(first_last_bits),
                           layer_bits=list(layer_bits) or None, calib_samples=calib_samples,
                           bias_correction=not no_bias_correction, seed=seed,
                           trust_code=trust_code)
    m = run_quantize(source, opts, out=out, log=c.logger(quiet), overwrite=overwrite)
    click.echo(f"run: {m['run_dir']}  W{m['weight_bits']}A{m['act_bits']} PTQ accuracy {m['student_accuracy']:.4f} "
               f"(fake-quant, PyTorch, test split)  float {m['student_float_accuracy']:.4f}  "
               f"{m['calib_samples']} calibration images  {m['seconds']:.0f}s")
