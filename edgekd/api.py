"""edgekd's Python API: the operations behind the CLI as plain functions, from one import point.

    from edgekd import api
    metrics = api.distill(api.DistillOptions(data="fashion-mnist", weight_bits=4, act_bits=4))
    manifest = api.export(metrics["run_dir"], "cpu")
    rows = api.bench([manifest["bundle_dir"]], profile="host-cpu")

They return values and raise edgekd.core.errors types; they never print or exit. ``log``
callbacks receive one human-readable line at a time (the CLI sends them to stderr).

Your own model and data, from a notebook: ``train``, ``distill`` and ``export`` take objects where
the CLI takes specs (the run records them as ``python-api``; export needs them again)::

    data = api.TorchData(train_set, test_set, classes=train_set.classes, mean=MEAN, std=STD)
    m = api.distill(api.DistillOptions(weight_bits=4, act_bits=4), teacher=my_resnet, student=my_small_net,
                    data=data)
    api.export(m["run_dir"], "cpu", student=my_small_net, data=data)
"""

from __future__ import annotations

from pathlib import Path

from .config.options import DEFAULT_TEACHER, DistillOptions, TrainOptions  # noqa: F401
from .data.options import DataOptions  # noqa: F401
from .data.torchdata import TorchData  # noqa: F401
from .pipeline.common import Log, quiet
from .pipeline.deploy import compile_bundle, export  # noqa: F401
from .pipeline.distill import distill, find_run, list_layers, load_float, load_student  # noqa: F401
from .pipeline.quantize import QuantizeOptions, quantize  # noqa: F401
from .pipeline.sweep import SweepOptions, run_sweep  # noqa: F401
from .pipeline.teachers import teacher_dir, train  # noqa: F401


def bench(bundles: list[str | Path] | None = None, profile: str | None = None, log: Log = quiet,
          **settings) -> list[dict]:
    """Bench bundles on this machine (the latest under bundles/ when none is given) with a profile's
    settings and budgets; ``settings`` override them (threads, iterations, batch_sizes, ...).
    Returns the rows as dicts (the ``bench --json`` contract)."""
    from . import bench as bench_core
    from .catalog import load_profile

    prof = load_profile(profile) if profile else None
    paths = bench_core.resolve_bundles(bundles or [])
    rows = bench_core.bench_bundles(paths, bench_core.resolve_settings(prof, **settings),
                                    prof.budgets if prof else None, prof.name if prof else None,
                                    progress=lambda p: log(f"benchmarking {p} ..."))
    return [r.to_dict() for r in rows]
