"""Explain: which layer of a quantized student breaks, measured on real samples.

For a run (its student, rebuilt) or a bundle (its run's student, the bundle's eval samples and its
ONNX graph), per Conv / Linear layer: what raising it to float in the quantized model gains at the
logits (``gain_db``, ranking ``gain``: most first; per layer type too, ``groups``); the SQNR
between the float student and the fake-quant one with only that layer quantized (``logits_db`` at
the logits, ranking ``alone``: worst first; ``isolated_db`` at the layer's output, ``weights_db`` /
``inputs_db`` for its weights or inputs alone), with the whole model quantized (``cumulative_db``),
and, where the bundle's backend can run its graph with tapped outputs (``Backend.run_tapped``: ONNX
Runtime, QONNX), between the fake-quant student and the runtime at the layer's requantized output
(``runtime_db``; None where they agree exactly, ``runtime_levels_off`` the share of values on another
integer level). Each layer and layer type is also priced: its share of the noise at the logits,
quantized alone (``noise_share``), and the packed weight bytes raising it adds (``raise_bytes``;
quant.sensitivity.add_costs): rank "bytes" orders by the one per KiB of the other, and "auto" (the
default) does where the whole model quantized has collapsed. The float reference of a student
trained with its quantizers is its float student (``_probe``). See quant.sensitivity (the PyTorch
side) and export.probe (the runtime side).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config.options import shown
from ..core import inputfile
from ..core.errors import EdgekdError, MissingFileError
from .common import Log, quiet

DEFAULT_SAMPLES = 500
MIN_SAMPLES, MAX_SAMPLES = 1, 100_000


def explain(source: str | Path | None = None, samples: int = DEFAULT_SAMPLES, run_dir: str | Path | None = None,
            student: str | None = None, trust_code: bool = False, log: Log = quiet, rank: str = "auto") -> dict:
    """Per-layer errors of the quantized student of ``source`` (a bundle or a run directory; default
    the latest bundle, else the latest run), on at most ``samples`` test images. ``run_dir``: the
    run a bundle was exported from, when it has moved. Returns a JSON-ready dict whose ``layers``
    are ranked by ``rank``: "gain" (most gained by raising the layer first), "alone" (lowest SQNR
    at the logits with only that layer quantized first), "bytes" (most of the noise removed per KiB
    of packed weights its raise adds first: quant.sensitivity.add_costs) or "auto" (gain, unless the
    whole model quantized has collapsed, where gains are noise: bytes); ``groups``: the same per
    layer type."""
    import torch

    from ..quant import layerbits, sensitivity
    from .distill import load_student

    if isinstance(samples, bool) or not isinstance(samples, int) or not MIN_SAMPLES <= samples <= MAX_SAMPLES:
        raise EdgekdError(f"--samples must be an integer between {MIN_SAMPLES} and {MAX_SAMPLES}, got {samples!r}")
    if rank not in (*sensitivity.RANKS, "auto"):
        raise EdgekdError(f"--rank must be one of auto, {', '.join(sensitivity.RANKS)}, got {shown(rank, 40)}")
    bundle, manifest, run = _resolve(source, run_dir)
    qmodel, meta = load_student(run, student, trust_code)
    metrics = _run_metrics(run)
    if bundle is not None:
        _check_same_student(bundle, manifest, run, meta, metrics)
    x = _samples(bundle, manifest, meta, samples)
    log(f"explaining {bundle or run}: {len(x)} test samples, {len(layerbits.compute_nodes(qmodel))} layers")
    probe, reference = _probe(run, metrics, qmodel, student, trust_code, torch.from_numpy(x))
    rows, extra = sensitivity.layer_errors(qmodel, torch.from_numpy(x), probe=probe)
    sensitivity.add_costs(rows, extra["groups"], _raise_bits((manifest or {}).get("target") or meta.get("target")))
    logits, note = dict(extra["logits"]), None
    chosen = rank if rank != "auto" else "gain" if logits["probe_agreement"] >= COLLAPSED_AGREEMENT else "bytes"
    if bundle is not None:
        runtime, note = _runtime(bundle, manifest, qmodel, x, log)
        for r in rows:
            r.update(_runtime_columns(extra["taps"].get(r["name"]), runtime.get(r["name"])))
        if "logits" in runtime:
            logits["runtime_sqnr_db"] = sensitivity.sqnr(extra["fake_logits"], runtime["logits"][0])
    spec = qmodel.edgekd_spec
    return {"source": str(bundle or run), "run_dir": str(run), "bundle_dir": str(bundle) if bundle else None,
            "target": manifest.get("target") if manifest else None, "samples": int(len(x)),
            "weight_bits": spec.weight_bits, "act_bits": spec.act_bits, "layer_bits": spec.layer_rules_text,
            "reference": reference, "logits": logits, "runtime_note": note, "rank": chosen, "rank_asked": rank,
            "caveat": _caveat(logits), "layers": sensitivity.RANKS[chosen](rows),
            "groups": sensitivity.best_buy_first(extra["groups"]) if chosen == "bytes" else extra["groups"]}


COLLAPSED_AGREEMENT = 0.5  # a probe agreeing with float on fewer samples than this ranks little


def _caveat(logits: dict) -> str | None:
    """What to make of the figures when the probe (every layer quantized, by calibration) has collapsed."""
    agreement = logits["probe_agreement"]
    if agreement >= COLLAPSED_AGREEMENT:
        return None
    return (f"quantized at these bits without training, the float student agrees with float on {agreement:.1%} of "
            "the samples: what raising one layer gains over that is near the noise floor. The error each layer "
            "makes quantized alone (the rest in float) is still measured, hence the noise shares; confirm a "
            "choice by training it (distill --layer-bits TYPE=W8A8)")


def _raise_bits(target_name) -> int:
    """The weight width a raise is priced at: the widest catalog target ``target_name`` trains (7 under
    reduce_range), or 8 for any other name (a recorded name is never read as a path)."""
    from .. import catalog
    from ..quant import autobits, sensitivity

    if not isinstance(target_name, str) or target_name not in catalog.target_names():
        return sensitivity.RAISE_BITS
    return max(autobits.widths(catalog.load_target(target_name)))


def _run_metrics(run: Path) -> dict:
    """The run's metrics.json (bounded: core.jsonfile), or {} when it is missing, unreadable or not a table."""
    from ..core import jsonfile

    try:
        metrics = jsonfile.read(run / "metrics.json")
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def _probe(run: Path, metrics: dict, qmodel, student, trust_code: bool, x) -> tuple[object, str]:
    """The model the per-layer sensitivities are measured on (quant.sensitivity.layer_errors), and what
    the float reference is, in words. A post-training-quantized student is its own probe (its
    quantizers off give its float weights). A student trained with its quantizers never ran with them
    off: its float student (``float.pt``, where QAT started) quantized at the same bits, the activation
    scales calibrated on the samples ``x``, is measured instead."""
    from ..quant.ptq import post_training_quantize
    from .distill import load_float

    if metrics.get("method") == "ptq":
        return qmodel, "the student with its quantizers off (post-training quantized: its float weights)"
    if not (run / "float.pt").is_file():
        return qmodel, ("the student's trained weights with its quantizers off: the run has no float student "
                        "(float.pt), and a student trained with its quantizers never ran without them, so the "
                        "per-layer figures may mislead")
    model, _ = load_float(run, student, trust_code)
    probe = post_training_quantize(model, qmodel.edgekd_spec, x, bias_correction=False)
    return probe, (f"the float student (float.pt); per-layer figures on it quantized at the run's bits, scales "
                   f"calibrated on the {len(x)} samples")


def _resolve(source, run_dir) -> tuple[Path | None, dict | None, Path]:
    """(bundle dir or None, its manifest, the run dir) of what ``explain`` was given."""
    from ..bundle import read_manifest, resolve_bundles, verify_files
    from .distill import find_run

    if source is None:
        try:
            source = resolve_bundles([])[0]
        except MissingFileError:
            return None, None, find_run(run_dir)
    path = Path(source)
    if not path.exists():
        raise MissingFileError(f"no such bundle or run: {path}", "pass a directory written by 'edgekd export' or "
                                                                  "'edgekd distill'")
    found = inputfile.special(path / "manifest.json")
    if found:  # a FIFO would block the read; never opened
        raise EdgekdError(f"corrupt bundle: {path / 'manifest.json'} is {found}, not a regular file",
                          "re-export the bundle")
    if not (path / "manifest.json").is_file():
        return None, None, find_run(path)
    manifest = read_manifest(path)
    if manifest.get("format") == "fp32" or not manifest.get("quant"):
        raise EdgekdError(f"{path} is an fp32 bundle: nothing in it is quantized", "explain a quantized bundle or run")
    verify_files(path, manifest)  # a damaged model.onnx or eval.npz: one line, not a protobuf traceback
    if run_dir is not None:
        if not (Path(run_dir) / "student.pt").is_file():
            raise MissingFileError(f"--run {run_dir} is not a run directory (no student.pt in it)",
                                   f"pass the run {path} was exported from (its manifest says "
                                   f"{shown(manifest.get('run_dir'), 80)})")
        return path, manifest, find_run(Path(run_dir))
    recorded = manifest.get("run_dir")
    run = Path(recorded) if isinstance(recorded, str) and recorded else None
    if run is None or not (run / "student.pt").is_file():
        raise MissingFileError(f"{path} was exported from run {shown(recorded, 80)}, which is not there",
                               "pass the run directory with --run DIR")
    return path, manifest, find_run(run)


def _check_same_student(bundle: Path, manifest: dict, run: Path, meta: dict, metrics: dict) -> None:
    """Refuse a run that is not the one the bundle was exported from (``--run`` naming another run, or
    the run distilled again since): its runtime columns would compare two different students. The
    manifest records the run's architecture, quantization spec and student accuracy; all must agree.
    ``metrics``: the run's metrics.json (``_run_metrics``)."""
    pairs = [("architecture", manifest.get("student"), meta.get("arch")),
             *_quant_pairs(manifest.get("quant"), meta.get("quant"))]
    ours, theirs = manifest.get("distill_student_accuracy"), metrics.get("student_accuracy")
    if isinstance(ours, float) and isinstance(theirs, float):
        pairs.append(("student accuracy", ours, theirs))
    differ = [f"{what} {shown(a, 60)} in the bundle, {shown(b, 60)} in the run" for what, a, b in pairs if a != b]
    if differ:
        raise EdgekdError(f"{bundle} was not exported from the student in {run}: {'; '.join(differ)}",
                          f"pass the run it was exported from with --run (its manifest says "
                          f"{shown(manifest.get('run_dir'), 80)}), or export {run} again")


def _quant_pairs(bundle_spec, run_spec) -> list[tuple]:
    """(what, the bundle's, the run's) for each field of the two quantization specs (older
    checkpoints lack ``first_last_by``: they found first and last layers by shape); the whole specs
    when one is not a table."""
    if not (isinstance(bundle_spec, dict) and isinstance(run_spec, dict)):
        return [("quantization spec", bundle_spec, run_spec)]
    ours, theirs = {"first_last_by": "shape", **bundle_spec}, {"first_last_by": "shape", **run_spec}
    return [(key, ours.get(key), theirs.get(key)) for key in dict.fromkeys([*ours, *theirs])]


def _samples(bundle, manifest, meta, n: int) -> np.ndarray:
    """The first ``n`` of a bundle's eval samples, or a seeded stratified sample of a run's test split."""
    if bundle is not None:
        from ..bundle import load_eval

        return np.ascontiguousarray(load_eval(bundle, manifest)[0][:n], dtype=np.float32)
    from .evalset import eval_arrays, read_test_split

    return eval_arrays(read_test_split(meta), n, meta["seed"])[0]


def _layer_calls(gm) -> list[tuple[str, tuple]]:
    """(path, weight shape) of every call of a Conv / Linear layer, in the order the student runs them."""
    from torch import nn

    calls = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                calls.append((node.target, tuple(m.weight.shape)))
    return calls


def _runtime(bundle: Path, manifest: dict, qmodel, x: np.ndarray, log: Log) -> tuple[dict, str | None]:
    """The runtime's value at every layer's requantized output (and ``logits``), and a note when the
    runtime side could not be measured: a backend without ``run_tapped`` (the note names those with it)."""
    from ..backends import get_backend, implementing

    def cannot() -> tuple[dict, str]:
        titles = [b.title or b.name for b in implementing("run_tapped")] or ["no"]
        listed = ", ".join(titles[:-1]) + " and " + titles[-1] if len(titles) > 1 else titles[0]
        return {}, (f"runtime comparison is done for {listed} bundles; this one is "
                    f"{shown(manifest.get('backend'), 60)}")

    try:
        backend = get_backend(manifest.get("backend"))
    except (EdgekdError, ImportError):  # a name no backend has (or a plug-in that fails to import)
        backend = None
    if backend not in implementing("run_tapped"):
        return cannot()
    path = bundle / "model.onnx"
    if not path.is_file():
        return {}, f"{path} is missing: no graph to read layer outputs from"
    import onnx

    from ..export import probe

    model = onnx.load(str(path))
    try:
        tapped = probe.taps(model, _layer_calls(qmodel))
    except ValueError as e:
        return {}, f"the graph's layers do not line up with the student's ({e})"
    tapped["logits"] = probe.Tap(model.graph.output[0].name)
    values = backend.run_tapped(path, model, tapped, x)
    if values is None:
        return cannot()
    log(f"ran {path.name} through {backend.name} with {len(tapped) - 1} layer outputs read")
    return {k: (v, lambda a, t=tapped[k]: probe.levels(model, t, a)) for k, v in values.items()}, None


def _runtime_columns(fake, runtime) -> dict:
    """``runtime_db`` (SQNR of the runtime's value against the fake-quant one, both on the tap's
    integer grid; None: equal) and ``runtime_levels_off`` (share of values on another level)."""
    from ..quant.sensitivity import sqnr

    if fake is None or runtime is None:
        return {"runtime_compared": False, "runtime_db": None, "runtime_levels_off": None}
    value, to_levels = runtime
    ours, theirs = to_levels(fake), to_levels(value)
    if ours is None:
        return {"runtime_compared": True, "runtime_db": sqnr(fake, value), "runtime_levels_off": None}
    return {"runtime_compared": True, "runtime_db": sqnr(ours, theirs),
            "runtime_levels_off": float(np.mean(ours != theirs))}


BARS = {"gain": ("gain at the logits, this layer raised to float",
                 "dB gained by raising the layer (more is a better buy)"),
        "alone": ("logits, only this layer quantized", "SQNR vs the float student (dB, higher is better)"),
        "bytes": ("share of the noise per KiB its raise adds", "% of the noise at the logits per KiB raised "
                  "(more is a better buy)")}


def _bar_values(rows: list[dict], rank: str) -> tuple[list[float], float]:
    """The bar lengths of ``rows`` under ``rank`` (an exact SQNR drawn past the largest; a layer with
    nothing to raise at 0), and where an exact SQNR is drawn."""
    if rank == "bytes":
        return [100 * (r["share_per_kb"] or 0.0) for r in rows], 0.0
    keys = ("gain_db",) if rank == "gain" else ("logits_db", "isolated_db", "cumulative_db")
    cap = max([r[k] for r in rows for k in keys if r.get(k) is not None] + [1.0]) + 5
    return [cap if r[keys[0]] is None else r[keys[0]] for r in rows], cap


def plot(result: dict, path) -> Path:
    """A PNG of the layers in ``result``'s ranking, first at the top. Rank ``gain``: bars of what raising
    each layer to float gains at the logits; ``bytes``: of its share of the noise per KiB raised; rank
    ``alone``: bars of the SQNR at the logits with only the layer quantized, with its SQNR at its own
    output (open dots) and with the whole model quantized (dots)."""
    from ..bench.report import check_plot_available
    from ..core.fsutil import atomic_path

    check_plot_available()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, rank = result["layers"], result.get("rank", "alone")
    bars, cap = _bar_values(rows, rank)
    fig = Figure(figsize=(7, 1.5 + 0.32 * len(rows)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ys = list(range(len(rows)))[::-1]
    colours = {"depthwise": "tab:red", "pointwise": "tab:blue", "conv": "tab:green", "linear": "tab:purple"}
    value = lambda r, k: cap if r[k] is None else r[k]  # noqa: E731  (None: exact)
    ax.barh(ys, bars, color=[colours.get(r["type"], "tab:gray") for r in rows], alpha=0.8, label=BARS[rank][0])
    if rank == "alone":
        ax.scatter([value(r, "isolated_db") for r in rows], ys, facecolors="none", edgecolors="black", s=18,
                   zorder=3, label="layer output, only this layer quantized")
        ax.scatter([value(r, "cumulative_db") for r in rows], ys, color="black", s=14, zorder=3,
                   label="layer output, whole model quantized")
    ax.set_yticks(ys, [f"{r['name']} ({r['type']}, W{r['weight_bits']}A{r['act_bits'] or '-'})" for r in rows],
                  fontsize="small")
    ax.set_xlabel(BARS[rank][1])
    ax.set_title(f"edgekd explain: {Path(result['source']).name}, W{result['weight_bits']}A{result['act_bits']}"
                 + (f" + {', '.join(result['layer_bits'])}" if result["layer_bits"] else ""), fontsize="medium")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", metadata={"Software": "edgekd (matplotlib)"})
    return Path(path)
