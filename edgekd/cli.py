"""The edgekd command line: a thin click shell over edgekd.api.

Commands parse options, call plain functions, render the result and set the exit code.
User errors (edgekd.errors.EdgekdError) become one line on stderr and exit code 2.
Heavy imports (torch, brevitas) happen inside the commands that need them.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import click

from . import __version__
from .errors import EdgekdError


def _one_line(message: str) -> str:
    return " ".join(message.split()).rstrip(".")


class EdgekdGroup(click.Group):
    """Every user error ends as one ``error:`` line on stderr and a non-zero exit, never a traceback:
    edgekd's own (EdgekdError, exit 2 or its own code) and click's usage errors (exit 2)."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:  # a program calling main(): click's own semantics, return the result
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as e:
            where = f"; see '{e.ctx.command_path} --help'" if e.ctx else ""
            click.echo(f"error: {_one_line(e.format_message())}{where}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"error: {_one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgekdError as e:
            click.echo(f"error: {e.one_line()}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


@click.group(cls=EdgekdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekd")
def main():
    """Quantized knowledge distillation for edge devices: distill, export, bench."""
    _quiet_third_party()


def _quiet_third_party() -> None:
    """Keep import-time chatter of torch/Brevitas off the terminal (none of it concerns the user:
    a CPU-only machine without CUDA, an optional Hadamard kernel, Brevitas's fx deprecation)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    for message in ("fast_hadamard_transform", "brevitas.fx is deprecated", ".*treespec.children_specs",
                    "Defining your `__torch_function__`", "Named tensors"):
        warnings.filterwarnings("ignore", message=message)


# --- core commands (train, distill, export, run) -----------------------------------------------

def _log(line: str) -> None:
    click.echo(line, err=True)


def _logger(quiet: bool):
    """Log lines go to stderr; with --quiet only warnings do."""
    return (lambda s: _log(s) if s.startswith("warning") else None) if quiet else _log


def _bits(bits, weight_bits, act_bits) -> tuple[int, int]:
    """--bits sets both; --weight-bits / --act-bits override one side."""
    w = weight_bits if weight_bits is not None else bits
    a = act_bits if act_bits is not None else bits
    for name, value in (("--weight-bits", w), ("--act-bits", a)):
        if not 2 <= value <= 8:
            raise EdgekdError(f"{name if (weight_bits or act_bits) else '--bits'} must be between 2 and 8, got {value}",
                              "use --bits 2, 4 or 8 (any integer from 2 to 8 works)")
    return w, a


_data_opt = click.option("--data", default="digits", show_default=True,
                         help="Dataset: digits, fashion-mnist[:DIR] or npz:FILE.")
_seed_opt = click.option("--seed", default=0, show_default=True, type=int, help="Seed for splits, init and order.")
_quiet_opt = click.option("--quiet", "-q", is_flag=True, help="No progress bar or log lines.")


def _training_opts(f):
    """--device, --amp and --resume, shared by train and distill."""
    f = click.option("--resume", is_flag=True,
                     help="Continue the interrupted run with the same options and --out from its checkpoint "
                          "(OUT.partial, written every epoch and on Ctrl-C / SIGTERM).")(f)
    f = click.option("--amp", is_flag=True,
                     help="bfloat16 mixed precision for the float phases on CUDA (QAT stays float32).")(f)
    return click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda[:N]",
                        help="Where to train. Multi-process: launch with 'torchrun --nproc-per-node N -m edgekd "
                             "...' (gloo on CPU, nccl on CUDA; --batch-size is the global batch).")(f)


@main.command()
@_data_opt
@click.option("--arch", default="cnn-teacher", show_default=True,
              help="Architecture: a built-in name, torchvision:NAME or module:callable.")
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=2e-3, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@_seed_opt
@click.option("--out", type=click.Path(path_type=Path), help="Output directory (default runs/teachers/NAME).")
@_training_opts
@_quiet_opt
def train(data, arch, epochs, lr, batch_size, seed, out, device, amp, resume, quiet):
    """Train a float model to use as a teacher."""
    from .api import TrainOptions, train as run_train
    from .distributed import launched_rank

    opts = TrainOptions(data=data, arch=arch, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                        progress=not quiet, device=device, amp=amp)
    metrics = run_train(opts, out=out, log=_logger(quiet), resume=resume)
    if launched_rank() != 0:  # torchrun: rank 0 reports
        return
    click.echo(f"teacher: {metrics['path']}  test accuracy {metrics['accuracy']:.4f}  "
               f"({metrics['params']:,} parameters, {metrics['seconds']:.0f}s)")


_METHODS_HELP = ("Distillation method (paper defaults; see README): hinton [default], kd, mse, dkd, tfkd, fitnet, "
                 "at, rkd, fsp, or none (QAT only). Ignored with a --config recipe that lists [[loss]] terms.")


@main.command()
@_data_opt
@click.option("--bits", default=8, show_default=True, type=int, help="Weight and activation bits (2..8).")
@click.option("--weight-bits", type=int, help="Weight bits, overriding --bits.")
@click.option("--act-bits", type=int, help="Activation bits, overriding --bits.")
@click.option("--teacher", multiple=True,
              help="Teacher: an edgekd checkpoint file, or an architecture to train once and reuse "
                   "[default: cnn-teacher]. Repeat for a multi-teacher ensemble.")
@click.option("--teacher-weight", "teacher_weights", multiple=True, type=click.FloatRange(0),
              help="Weight of each --teacher in the ensemble (repeat, same order) [default: equal].")
@click.option("--teacher-mix", type=click.Choice(["probs", "logits"]), default="probs", show_default=True,
              help="Ensemble: average the teachers' probabilities or their logits.")
@click.option("--student", default="cnn-student", show_default=True,
              help="Student: a built-in name, torchvision:NAME or module:callable (must trace with torch.fx).")
@click.option("--target", default="onnxruntime-cpu", show_default=True,
              help="Target whose quantizer conventions the student is trained with (name, alias or .toml).")
@click.option("--method", default="hinton", show_default=True, help=_METHODS_HELP)
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A hyper-parameter of --method, e.g. --param beta=8 for dkd, --param student=5 for fitnet "
                   "(repeatable; values are TOML: 8, 0.5, \"5\", [\"5\",\"8\"]).")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.toml",
              help="Recipe: [[loss]] terms with weights, and any distill option as a top-level key. Options "
                   "given here that differ from their defaults override the file.")
@click.option("--temperature", "-T", default=4.0, show_default=True, type=float, help="KD temperature T (hinton).")
@click.option("--alpha", default=0.9, show_default=True, type=float,
              help="Weight of the KD term, 1-alpha on labels (hinton).")
@click.option("--scheme", default="offline", show_default=True,
              type=click.Choice(["offline", "born-again", "dml", "assistant", "progressive"]),
              help="offline: a fixed teacher; born-again: each generation taught by the previous student; dml: "
                   "mutual learning with float peers; assistant: teacher -> assistant(s) -> student; progressive: "
                   "bit schedule 8 -> 4 -> 2, each stage distilled from the last.")
@click.option("--order", type=click.Choice(["joint", "float-first"]),
              help="joint: KD and QAT together from the first step (no float phase); float-first: float KD for "
                   "--float-epochs, then QAT with KD. [default: float-first if --float-epochs > 0, else joint]")
@click.option("--epochs", default=8, show_default=True, type=click.IntRange(1), help="QAT epochs.")
@click.option("--float-epochs", default=8, show_default=True, type=click.IntRange(0),
              help="Float KD epochs before QAT (0: QAT from scratch).")
@click.option("--teacher-epochs", default=20, show_default=True, type=click.IntRange(1),
              help="Epochs when the teacher has to be trained first.")
@click.option("--generations", default=2, show_default=True, type=click.IntRange(1), help="born-again generations.")
@click.option("--peers", default=1, show_default=True, type=click.IntRange(1), help="dml: number of float peers.")
@click.option("--assistant", "assistants", multiple=True, help="assistant: architecture(s) of the chain, in order "
                                                                "[default: resnet-student].")
@click.option("--assistant-epochs", type=click.IntRange(1), help="Epochs per assistant [default: float + QAT epochs].")
@click.option("--bit-schedule", metavar="B,B,...", help="progressive: bits per stage, e.g. 8,4 "
                                                          "[default: 8 -> 4 -> 2 down to --bits].")
@click.option("--flip/--no-flip", default=None,
              help="Random horizontal flips [default: the dataset's]. Off, the teacher's outputs are cached.")
@click.option("--no-cache", is_flag=True, help="Run the teacher on every batch even when its outputs could be cached.")
@click.option("--lr", default=2e-3, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Learning rate of the float phase (QAT uses lr/4 after a float phase).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--first-last-bits", default="8", show_default=True,
              help="Weight bits of the first and last layers, or 'same' to use --weight-bits.")
@_seed_opt
@click.option("--out", type=click.Path(path_type=Path), help="Run directory (default runs/NAME).")
@click.option("--list-layers", is_flag=True, help="Print the layer names feature terms can use, and exit.")
@_training_opts
@_quiet_opt
def distill(data, bits, weight_bits, act_bits, teacher, teacher_weights, teacher_mix, student, target, method, params,
            config, temperature, alpha, scheme, order, epochs, float_epochs, teacher_epochs, generations, peers,
            assistants, assistant_epochs, bit_schedule, flip, no_cache, lr, batch_size, first_last_bits, seed, out,
            list_layers, device, amp, resume, quiet):
    """Train a quantized student by knowledge distillation (Brevitas QAT at 2..8 bits).

    \b
    Examples:
      edgekd distill --bits 4 --method dkd --param beta=8
      edgekd distill --bits 4 --method fitnet --param 'student=["8"]' --param 'teacher=["5.relu"]'
      edgekd distill --bits 2 --scheme progressive
      edgekd distill --config recipe.toml
    """
    from .api import DistillOptions, distill as run_distill
    from .distributed import launched_rank

    w, a = _bits(bits, weight_bits, act_bits)
    flb = None if first_last_bits == "same" else _int_in(first_last_bits, "--first-last-bits")
    teachers = list(teacher)
    opts = DistillOptions(data=data, teacher=teachers[0] if len(teachers) == 1 else (teachers or None), student=student,
                          weight_bits=w, act_bits=a, target=target, method=method, params=_params(params),
                          config=str(config) if config else None, temperature=temperature, alpha=alpha,
                          scheme=scheme, order=order, epochs=epochs, float_epochs=float_epochs,
                          teacher_epochs=teacher_epochs, teacher_weights=list(teacher_weights) or None,
                          teacher_mix=teacher_mix, generations=generations, peers=peers,
                          assistants=list(assistants) or ["resnet-student"], assistant_epochs=assistant_epochs,
                          bit_schedule=_bit_list(bit_schedule), flip=flip, cache=not no_cache, lr=lr,
                          batch_size=batch_size, first_last_bits=flb, seed=seed, progress=not quiet,
                          device=device, amp=amp)
    if list_layers:
        from .api import list_layers as layers

        for role, rows in layers(opts).items():
            click.echo(f"{role} layers:")
            for r in rows:
                click.echo(f"  {r['name']:<24} {r['type']:<20} {tuple(r['shape'])}")
        return
    m = run_distill(opts, out=out, log=_logger(quiet), resume=resume)
    if launched_rank() != 0:  # torchrun: rank 0 reports
        return
    teacher_acc = f"{m['teacher_accuracy']:.4f}" if m["teacher_accuracy"] is not None else "-"
    click.echo(f"run: {m['run_dir']}  W{m['weight_bits']}A{m['act_bits']} student accuracy {m['student_accuracy']:.4f} "
               f"(fake-quant, PyTorch, test split)  teacher {teacher_acc}  {m['seconds']:.0f}s")


def _params(items) -> dict:
    """--param KEY=VALUE pairs; values parse as TOML (numbers, strings, lists), else stay strings."""
    import tomllib

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EdgekdError(f"--param takes KEY=VALUE, got {item!r}", "e.g. --param beta=8")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


def _bit_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise EdgekdError(f"--bit-schedule takes comma-separated integers, got {text!r}", "e.g. --bit-schedule 8,4") from None


def _int_in(text: str, option: str) -> int:
    if not text.isdigit() or not 2 <= int(text) <= 8:
        raise EdgekdError(f"{option} must be an integer from 2 to 8 or 'same', got {text!r}")
    return int(text)


@main.command()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option("--target", default="onnxruntime-cpu", show_default=True, help="Target name, alias or .toml file.")
@click.option("--out", type=click.Path(path_type=Path), help="Bundle directory (default bundles/RUN-TARGET).")
@_quiet_opt
def export(run_dir, target, out, quiet):
    """Export a distilled student for a target, compile it and check it against PyTorch."""
    from .api import export as run_export

    m = run_export(run_dir, target, out=out, log=_logger(quiet))
    p = m["parity"]
    fusion = m.get("fusion") or {}
    fused = f"  float compute nodes left: {fusion['float_compute']}" if "float_compute" in fusion else ""
    click.echo(f"bundle: {m['bundle_dir']}  {m['format']} for {m['target']}  runtime accuracy "
               f"{m['runtime_accuracy']:.4f} (torch {m['torch_accuracy']:.4f})  parity: top-1 agreement "
               f"{p['top1_agreement']:.4f} on {p['n']} samples, max abs diff {p['max_abs_diff']:.3g}{fused}")

# --- end core commands --------------------------------------------------------------------------

# --- compile -------------------------------------------------------------------------------------
@main.command("compile")
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--profile", metavar="NAME|FILE.toml",
              help="Device profile: DLA cores and the batch sizes the engine's profile must cover.")
@_quiet_opt
def compile_command(bundle, profile, quiet):
    """Build a bundle's TensorRT engine on this device (a Jetson or a machine with an NVIDIA GPU).

    Runs where the engine will run: engines do not move between GPUs or TensorRT versions.
    Needs TensorRT's Python bindings and cuda-python (pip install 'edgekd[tensorrt]'; on a
    Jetson, TensorRT comes with JetPack), never torch. Checks the engine against the PyTorch
    logits saved at export and updates the manifest (compiled: true, model_file: model.engine).
    """
    from .api import compile_bundle

    m = compile_bundle(bundle, profile, log=_logger(quiet))
    p, layers = m["engine_parity"], m["engine"]["layers"]
    click.echo(f"engine: {Path(m['bundle_dir']) / m['model_file']}  TensorRT {m['engine']['trt_version']} on "
               f"{m['engine']['device']}  int8 layers {len(layers['int8_layers'])}/{layers['layers']}  parity: top-1 "
               f"agreement {p['top1_agreement']:.4f} on {p['n']} samples, max abs diff {p['max_abs_diff']:.3g}")
# --- end compile -----------------------------------------------------------------------------------

# --- bench ----------------------------------------------------------------------------------------
@main.command("bench")
@click.argument("bundles", nargs=-1, type=click.Path(path_type=Path))
@click.option("--profile", metavar="NAME|FILE.toml",
              help="Device profile: bench settings and budgets (e.g. host-cpu, or a .toml path).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write the rows as JSON (a list of objects).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write the rows as CSV (nested keys flattened with dots).")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write the table as GitHub Markdown.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.png",
              help="Plot accuracy vs p50 latency (needs: pip install 'edgekd[plot]').")
@click.option("--strict", is_flag=True, help="Exit 1 if any row is not ok (budget fail, error, skipped).")
@click.option("--threads", type=click.IntRange(min=0), help="Intra-op threads; 0 lets the runtime choose.")
@click.option("--iterations", type=click.IntRange(min=1), help="Minimum number of timed runs.")
@click.option("--warmup", type=click.IntRange(min=0), help="Minimum number of warm-up runs.")
@click.option("--warmup-time", "warmup_s", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Minimum warm-up time.")
@click.option("--min-time", "min_time_s", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Minimum timed duration.")
@click.option("--batch-size", "batch_sizes", type=click.IntRange(min=1), multiple=True,
              help="Batch size to time (repeatable); overrides the profile's list.")
def bench_command(bundles, profile, json_path, csv_path, markdown_path, plot_path, strict, **overrides):
    """Benchmark exported bundles on this machine (needs only numpy and the runtime).

    With no BUNDLE, benches the latest bundle under bundles/. Prints one table: status, bits,
    size, accuracy through the runtime next to the PyTorch accuracy, p50/p90/p99 latency,
    throughput, peak memory and the profile's budget verdict; see edgekd.bench for definitions.

    \b
    Exit codes:
      0  every bundle was benchmarked and reported (rows may still fail or error
         unless --strict)
      1  --strict and some row's status is fail, error or skipped
      2  usage error: no bundle found, unknown profile, bad option, missing extra
    """
    from . import bench as bench_core
    from . import report
    from .catalog import load_profile

    if plot_path:
        report.check_plot_available()
    prof = load_profile(profile) if profile else None
    settings = bench_core.resolve_settings(prof, **overrides)
    paths = bench_core.resolve_bundles(bundles)
    rows = bench_core.bench_bundles(paths, settings, prof.budgets if prof else None, prof.name if prof else None,
                                    progress=lambda p: click.echo(f"benchmarking {p} ...", err=True))
    click.echo(report.render_table(rows), nl=False)
    for path in report.write_outputs(rows, json_path, csv_path, markdown_path):
        click.echo(f"wrote {path}", err=True)
    if plot_path:
        click.echo(f"wrote {report.plot(rows, plot_path, prof.budgets if prof else None)}", err=True)
    click.get_current_context().exit(bench_core.exit_code(rows, strict))
# --- end bench ------------------------------------------------------------------------------------

# --- sweep ----------------------------------------------------------------------------------------
def _sweep_ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=option) from None
    if not values:
        raise click.BadParameter("give at least one value", param_hint=option)
    return values


def _sweep_columns():
    from .report import Column

    return (Column("pareto", lambda r: "*" if r.get("pareto") else "", numeric=False),
            Column("best", lambda r: "<-" if r.get("best") else "", numeric=False))


@main.command("sweep")
@_data_opt
@click.option("--bits", default="8,4,2", show_default=True, help="Bit widths to sweep (weights and activations).")
@click.option("--methods", default="hinton", show_default=True, help="Distillation methods to sweep (hinton, none).")
@click.option("--target", default="onnxruntime-cpu", show_default=True, help="Target name, alias or .toml file.")
@click.option("--profile", metavar="NAME|FILE.toml", help="Device profile: bench settings and budgets.")
@click.option("--teacher", help="Teacher checkpoint file or architecture [default: cnn-teacher].")
@click.option("--student", default="cnn-student", show_default=True, help="Student architecture.")
@click.option("--epochs", default=8, show_default=True, type=click.IntRange(1), help="QAT epochs per cell.")
@click.option("--float-epochs", default=8, show_default=True, type=click.IntRange(0), help="Float KD epochs first.")
@click.option("--teacher-epochs", default=20, show_default=True, type=click.IntRange(1),
              help="Epochs when the teacher has to be trained first (once, shared by the cells).")
@_seed_opt
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Sweep root (default runs/sweeps/DATA-STUDENT-TARGET); re-running resumes it.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write the rows as JSON (bench rows plus cell, method, pareto, best).")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write the table and the summary as GitHub Markdown.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.png",
              help="Plot accuracy vs p50 latency with the Pareto set (needs: pip install 'edgekd[plot]').")
@_quiet_opt
def sweep_command(data, bits, methods, target, profile, teacher, student, epochs, float_epochs, teacher_epochs,
                  seed, out, json_path, markdown_path, plot_path, quiet):
    """Distill, export and bench each bit width (and method), then show the Pareto set.

    Finished stages of a cell (run dir, bundle, bench rows under the sweep root) are reused, so
    re-running the same command resumes. A failing cell becomes an error row; the rest go on.
    Prints one table (with pareto and best marks), the Pareto set at the first batch size, and
    the configuration with the best accuracy among those that meet every budget of --profile.
    """
    from . import report
    from .sweep import SweepOptions, run_sweep, summary

    if plot_path:
        report.check_plot_available()
    opts = SweepOptions(bits=_sweep_ints(bits, "--bits"), methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                        data=data, target=target, student=student, teacher=teacher, epochs=epochs,
                        float_epochs=float_epochs, teacher_epochs=teacher_epochs, seed=seed, profile=profile,
                        root=out, progress=not quiet)
    result = run_sweep(opts, log=_logger(quiet))
    cols, footer = _sweep_columns(), summary(result)
    click.echo(report.render_table(result.rows, cols, footer), nl=False)
    for path in report.write_outputs(result.rows, json_path, None, markdown_path, cols, footer):
        click.echo(f"wrote {path}", err=True)
    if plot_path:
        front_rows = [r for r in result.rows if r.get("batch_size") == result.batch_size]
        title = f"edgekd sweep: {data}, {result.rows[0].get('target') or target} (marker area ~ size)"
        click.echo(f"wrote {report.plot(front_rows, plot_path, result.budgets, title=title, front=result.pareto)}",
                   err=True)
# --- end sweep ------------------------------------------------------------------------------------

# --- catalog (targets, profiles, check) -----------------------------------------------------------

def _cat_echo_json(value) -> None:
    import json

    click.echo(json.dumps(value, indent=2))


def _cat_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """Print rows as aligned columns; on a terminal the last column is cut to its width."""
    import shutil

    cells = [[_cat_text(r[key]) for key, _ in columns] for r in rows]
    heads = [head for _, head in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    room = max(20, shutil.get_terminal_size().columns - sum(widths[:-1]) - 2 * (len(widths) - 1))
    if not sys.stdout.isatty():
        room = 10**6
    for line in [heads] + cells:
        last = line[-1] if len(line[-1]) <= room else line[-1][: room - 3] + "..."
        click.echo("  ".join(c.ljust(w) for c, w in zip(line[:-1], widths)) + "  " + last)


def _cat_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    return "-" if value in ("", None) else str(value)


def _cat_tree(mapping: dict, indent: int = 2, notes: dict | None = None) -> None:
    """Print a nested mapping as indented 'key  value' lines (notes: key -> trailing comment)."""
    width = max((len(k) for k in mapping), default=0)
    value_width = max((len(_cat_text(v)) for v in mapping.values() if not isinstance(v, dict)), default=0)
    for key, value in mapping.items():
        if isinstance(value, dict):
            click.echo(" " * indent + key)
            _cat_tree(value, indent + 2)
            continue
        line = " " * indent + key.ljust(width) + "  " + _cat_text(value)
        if notes and key in notes:
            line = line.ljust(indent + width + 2 + value_width) + f"  # {notes[key]}"
        click.echo(line)


@main.group("targets")
def targets_group():
    """Deployment targets: how an artifact is produced and run (targets/*.toml)."""


@targets_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (every field of every target).")
def targets_list(as_json):
    """List the targets in the catalog."""
    from . import catalog

    targets = catalog.list_targets()
    if as_json:
        return _cat_echo_json([catalog.as_dict(t) for t in targets])
    _cat_table([catalog.target_summary(t) for t in targets],
               [("name", "NAME"), ("aliases", "ALIASES"), ("backend", "BACKEND"), ("flavour", "FLAVOUR"),
                ("weight_bits", "W BITS"), ("act_bits", "A BITS"), ("accelerated", "ACCELERATED"),
                ("description", "DESCRIPTION")])


@targets_group.command("show")
@click.argument("name", metavar="NAME|FILE.toml")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def targets_show(name, as_json):
    """Show one target: a name, an alias, a profile (its preferred target) or a .toml file."""
    from . import catalog

    _, _, via = catalog.resolve_target(name)
    t = catalog.load_target(name)
    if as_json:
        return _cat_echo_json(catalog.as_dict(t))
    click.echo(f"{t.name}  {t.description}")
    if via.startswith("profile:"):
        click.echo(f"  (preferred target of profile {via.split(':', 1)[1]})")
    tol = f"top-1 agreement >= {t.tolerance.min_top1_agreement}" + (
        f", |logit diff| <= {t.tolerance.max_abs_diff}" if t.tolerance.max_abs_diff is not None else "")
    _cat_tree({"file": t.path, "aliases": list(t.aliases), "backend": t.backend, "flavour": t.flavour,
               "opset": t.opset,
               "weight bits": f"accepts {catalog.bits_text(t.weight_bits)}, "
                              f"accelerated {catalog.bits_text(t.accelerated('weight'))}",
               "act bits": f"accepts {catalog.bits_text(t.act_bits)}, "
                           f"accelerated {catalog.bits_text(t.accelerated('act'))}",
               "tolerance": tol})
    click.echo("  quant")
    q = _cat_asdict(t.quant)
    q["first_last_bits"] = q["first_last_bits"] or "same as the rest"
    _cat_tree(q, indent=4)
    click.echo("  options")
    helps = {k: o.help for k, o in catalog.BACKEND_OPTIONS[t.backend].items()}
    _cat_tree(t.options, indent=4, notes=helps)


def _cat_asdict(obj) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)


@main.group("profiles")
def profiles_group():
    """Device profiles: hardware facts, targets, bench settings, budgets (profiles/*.toml)."""


@profiles_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (every field of every profile).")
def profiles_list(as_json):
    """List the device profiles in the catalog."""
    from . import catalog

    profiles = catalog.list_profiles()
    if as_json:
        return _cat_echo_json([catalog.as_dict(p) for p in profiles])
    _cat_table([catalog.profile_summary(p) for p in profiles],
               [("name", "NAME"), ("aliases", "ALIASES"), ("cpu", "CPU"), ("memory_gb", "MEM GB"),
                ("accelerator", "ACCELERATOR"), ("targets", "TARGETS")])


@profiles_group.command("show")
@click.argument("name", metavar="NAME|FILE.toml")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def profiles_show(name, as_json):
    """Show one device profile (a name, an alias or a .toml file)."""
    from . import catalog

    p = catalog.load_profile(name)
    if as_json:
        return _cat_echo_json(catalog.as_dict(p))
    click.echo(f"{p.name}  {p.description}")
    _cat_tree({"file": p.path, "aliases": list(p.aliases), "targets": list(p.targets)})
    hardware = {k: v for k, v in p.hardware.items() if k != "sources"}
    click.echo("  hardware")
    _cat_tree(hardware, indent=4)
    click.echo("  bench")
    _cat_tree(_cat_asdict(p.bench), indent=4)
    click.echo("  budgets")
    _cat_tree({k: v for k, v in _cat_asdict(p.budgets).items() if v is not None}, indent=4)
    if p.hardware.get("sources"):
        click.echo("  sources")
        for source in p.hardware["sources"]:
            click.echo(f"    - {source}")


@main.command("check")
@click.option("--target", required=True, metavar="NAME|FILE.toml", help="Target name, alias, profile or .toml file.")
@click.option("--student", metavar="SPEC", help="Student architecture (recorded in the JSON output).")
@click.option("--bits", default=8, show_default=True, type=int, help="Weight and activation bits.")
@click.option("--weight-bits", type=int, help="Weight bits, overriding --bits.")
@click.option("--act-bits", type=int, help="Activation bits, overriding --bits.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def check_command(target, student, bits, weight_bits, act_bits, as_json):
    """Pre-flight, before training: what TARGET will not accept or not accelerate at these bits.

    Exits 2 when any finding is an error (the exported model would not run on the target).
    """
    from . import catalog

    w = bits if weight_bits is None else weight_bits
    a = bits if act_bits is None else act_bits
    t = catalog.load_target(target)
    findings = catalog.preflight(t, w, a)
    errors = sum(f["level"] == "error" for f in findings)
    if as_json:
        _cat_echo_json({"target": t.name, "weight_bits": w, "act_bits": a, "student": student,
                        "ok": errors == 0, "findings": findings})
    else:
        _cat_findings(t, w, a, findings)
    if errors:
        click.echo(f"error: W{w}A{a} cannot be deployed to {t.name} ({errors} error{'s' * (errors > 1)})", err=True)
        sys.exit(2)


def _cat_findings(t, w: int, a: int, findings: list[dict]) -> None:
    click.echo(f"check W{w}A{a} on {t.name} ({t.backend}, {t.flavour})")
    for f in findings:
        click.echo(f"  {f['level']:<8} {f['message']}")
        if f["suggestion"]:
            click.echo(f"  {'':<8} -> {f['suggestion']}")
    counts = {level: sum(f["level"] == level for f in findings) for level in ("error", "warning", "info")}
    if not findings:
        click.echo(f"  ok: W{w}A{a} is accepted and accelerated by {t.name}")
    else:
        click.echo("  " + ", ".join(f"{n} {level}{'s' * (n != 1 and level != 'info')}"
                                    for level, n in counts.items()))


# --- end catalog ----------------------------------------------------------------------------------
