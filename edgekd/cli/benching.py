"""``edgekd bench`` (time bundles through their runtime) and ``edgekd sweep`` (distill, export and
bench each bit width, then pick)."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import options as op
from ..core.text import clean
from . import common as c
from .app import main
from .bench_host import bench_on_hosts, host_options, split_host_options

@main.command("bench")
@click.argument("bundles", nargs=-1, type=click.Path(path_type=Path))
@click.option("--profile", metavar="NAME|FILE.toml",
              help="Device profile: bench settings and budgets (e.g. host-cpu, or a .toml path).")
@click.option("--json", "json_path", type=c.OutPath(), metavar="FILE",
              help="Write the rows as JSON (a list of objects).")
@click.option("--csv", "csv_path", type=c.OutPath(), metavar="FILE",
              help="Write the rows as CSV (nested keys flattened with dots).")
@click.option("--markdown", "markdown_path", type=c.OutPath(), metavar="FILE",
              help="Write the table as GitHub Markdown.")
@click.option("--plot", "plot_path", type=c.OutPath(), metavar="FILE.png",
              help="Plot accuracy vs p50 latency (needs: pip install 'edgekd[plot]').")
@click.option("--strict", is_flag=True, help="Exit 1 if any row is not ok (budget fail, error, skipped).")
@c.overwrite_opt
@c.flag("threads", default=None, show_default=False)
@c.flag("iterations", default=None, show_default=False)
@c.flag("warmup", default=None, show_default=False)
@c.flag("warmup_s", "--warmup-time", default=None, show_default=False)
@c.flag("min_time_s", "--min-time", default=None, show_default=False)
@c.flag("batch_sizes", "--batch-size", default=(), show_default=False, multiple=True, type=int)
@host_options
def bench_command(bundles, profile, json_path, csv_path, markdown_path, plot_path, strict, overwrite, **overrides):
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
    130  interrupted (Ctrl-C); with --host the rows measured so far are shown

    With --host, the bundles are benched on the device over SSH (see edgekd.bench.remote): one
    table with a host column and one line per host (governor, temperature, throttling, clocks).
    """
    from .. import bench as bench_core
    from ..bench import report
    from ..catalog import load_profile

    if plot_path:
        report.check_plot_available()
    remote = split_host_options(overrides)
    prof = load_profile(profile) if profile else None
    settings = bench_core.resolve_settings(prof, **overrides)
    paths = bench_core.resolve_bundles(bundles)
    inputs = [*paths, prof.path] if prof and prof.path else paths  # a report never replaces what is read
    report.check_outputs(inputs, overwrite, json=json_path, csv=csv_path, markdown=markdown_path, plot=plot_path)
    if remote["hosts"]:
        outputs = {"json": json_path, "csv": csv_path, "markdown": markdown_path, "plot": plot_path}
        click.get_current_context().exit(bench_on_hosts(paths, prof, overrides, remote, outputs, strict))
    rows = _bench_here(paths, settings, prof)
    click.echo(report.render_table(rows), nl=False)
    for path in report.write_outputs(rows, json_path, csv_path, markdown_path):
        click.echo(f"wrote {clean(path)}", err=True)
    if plot_path:
        click.echo(f"wrote {clean(report.plot(rows, plot_path, prof.budgets if prof else None))}", err=True)
    click.get_current_context().exit(bench_core.exit_code(rows, strict))


def _bench_here(paths, settings, prof):
    """Bench on this machine; Ctrl-C / SIGTERM stop it within seconds even inside the runtime's C
    code (cli.stopping: nothing is written until the rows are complete)."""
    from .. import bench as bench_core
    from .stopping import stop_promptly

    with stop_promptly():
        return bench_core.bench_bundles(paths, settings, prof.budgets if prof else None, prof.name if prof else None,
                                        progress=lambda p: click.echo(f"benchmarking {clean(p)} ...", err=True))



def _sweep_ints(text: str, option: str) -> tuple[int, ...]:
    items = [v.strip() for v in text.split(",")]
    try:  # ASCII digits only (int() reads '８' and '1_0' too); an empty item ('8,,4') is a typo, not skipped
        values = tuple(int(v) if v.isascii() and "_" not in v else int("?") for v in items if v)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=option) from None
    if not values:
        raise click.BadParameter("give at least one value", param_hint=option)
    if len(values) != len(items):
        raise click.BadParameter(f"expected comma-separated integers, got {text!r} (an empty item)", param_hint=option)
    return values


def _sweep_columns():
    from ..bench.report import Column

    return (Column("pareto", lambda r: "*" if r.get("pareto") else "", numeric=False),
            Column("best", lambda r: "<-" if r.get("best") else "", numeric=False))


@main.command("sweep")
@c.data_opt
@c.data_opts
@click.option("--bits", default="8,4,2", show_default=True, help="Bit widths to sweep (weights and activations).")
@click.option("--methods", default="hinton", show_default=True,
              help="Methods to sweep: KD methods (hinton, dkd, ...), none (QAT alone), ptq (post-training "
                   "quantization of the first trained method's float student).")
@click.option("--seeds", metavar="S,S,...", help="Seeds to repeat every cell with [default: --seed alone].")
@click.option("--reference", is_flag=True, help="Add the float student as an fp32 bundle (the reference row).")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.toml",
              help="A distill recipe applied to every trained cell.")
@c.flag("target", help="Target name, alias or .toml file.")
@c.layer_bits_opt
@click.option("--profile", metavar="NAME|FILE.toml", help="Device profile: bench settings and budgets.")
@click.option("--teacher", help="Teacher checkpoint file or architecture [default: cnnfc-teacher].")
@c.flag("student")
@c.flag("epochs", help="QAT epochs per cell [default: each cell's, by its bits: 4, or 8 at 3 bits or fewer].")
@c.flag("float_epochs")
@c.flag("teacher_epochs", help="Epochs when the teacher has to be trained first (once, shared by the cells).")
@c.flag("qat_temperature", help=op.OPTIONS["qat_temperature"].help + " Goes to the hinton and kd cells.")
@c.flag("qat_lr")
@c.seed_opt
@c.out_option("--out", help="Sweep root (default runs/sweeps/DATA-STUDENT-TARGET); re-running resumes it.")
@c.overwrite_opt
@click.option("--json", "json_path", type=c.OutPath(), metavar="FILE",
              help="Write the rows as JSON (bench rows plus cell, method, pareto, best).")
@click.option("--markdown", "markdown_path", type=c.OutPath(), metavar="FILE",
              help="Write the table and the summary as GitHub Markdown.")
@click.option("--plot", "plot_path", type=c.OutPath(), metavar="FILE.png",
              help="Plot accuracy vs p50 latency with the Pareto set (needs: pip install 'edgekd[plot]').")
@c.quiet_opt
def sweep_command(data, bits, methods, seeds, reference, config, target, layer_bits, profile, teacher, student, epochs,
                  float_epochs, teacher_epochs, qat_temperature, qat_lr, seed, out, overwrite, json_path, markdown_path,
                  plot_path, quiet, **read):
    """Distill, export and bench each bit width (and method), then show the Pareto set.

    Finished stages of a cell (run dir, bundle, bench rows under the sweep root) are reused, so
    re-running the same command resumes. A failing cell becomes an error row; the rest go on, and
    the exit code is 1 when every cell failed.
    Prints one table (with pareto and best marks), the Pareto set at the first batch size, and
    the configuration with the best accuracy among those that meet every budget of --profile.
    """
    from ..bench import report
    from ..pipeline.sweep import SweepOptions, run_sweep, summary

    if plot_path:
        report.check_plot_available()
    report.check_outputs((), overwrite, json=json_path, markdown=markdown_path, plot=plot_path)
    opts = SweepOptions(bits=_sweep_ints(bits, "--bits"), methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                        data=data, target=target, student=student, teacher=teacher, epochs=epochs,
                        float_epochs=float_epochs, teacher_epochs=teacher_epochs, qat_temp=qat_temperature,
                        qat_lr=qat_lr, seed=seed, profile=profile,
                        seeds=_sweep_ints(seeds, "--seeds") if seeds else None, reference=reference,
                        config=str(config) if config else None, layer_bits=tuple(layer_bits),
                        root=out, progress=not quiet, overwrite=overwrite, read=read)
    result = run_sweep(opts, log=c.logger(quiet))
    cols, footer = _sweep_columns(), summary(result)
    click.echo(report.render_table(result.rows, cols, footer), nl=False)
    for path in report.write_outputs(result.rows, json_path, None, markdown_path, cols, footer):
        click.echo(f"wrote {path}", err=True)
    if plot_path:
        front_rows = [r for r in result.rows if r.get("batch_size") == result.batch_size]
        title = f"edgekd sweep: {data}, {result.rows[0].get('target') or target} (marker area ~ size)"
        click.echo(f"wrote {report.plot(front_rows, plot_path, result.budgets, title=title, front=result.pareto)}",
                   err=True)
    if result.rows and all(r.get("status") == "error" for r in result.rows):
        click.get_current_context().exit(1)
