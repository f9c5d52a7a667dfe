"""Benchmark bundles on this machine: verify, time, measure accuracy and memory, judge budgets.

Needs only numpy and the bundle's runtime (never torch). Returns rows; never prints or exits.
One row per bundle and batch size. A bundle that fails yields an ``error`` row and the others
still run. Row ``status``: ``ok``; ``fail`` (measured, but over a profile budget); ``error``
(message in ``error``); ``skipped`` (reason in ``note``, e.g. a fixed batch dimension).

Definitions used in every row:
- Timing follows trtexec / onnxruntime_perf_test: warm-up runs until at least ``warmup`` runs
  AND ``warmup_s`` seconds have passed, then timed runs until at least ``iterations`` runs AND
  ``min_time_s`` seconds. Each run is one runtime call (``session.run``) on a batch of real eval
  samples, timed alone with ``time.perf_counter``; Python's garbage collector is paused while
  timing. ``latency_ms`` holds min, mean, p50, p90, p95, p99 (numpy's linear interpolation
  between order statistics) and std (population standard deviation) of those per-call times.
- ``throughput_ips`` = batch size / mean latency in seconds: images per second of one stream of
  back-to-back calls (no concurrent requests).
- ``accuracy``: top-1 accuracy through the runtime on all of eval.npz (0..1), which holds the
  whole test split or a seeded, stratified sample of it (``accuracy_source`` says which, e.g.
  "eval sample (2000 of 10000 test images)"); ``accuracy_full``: the runtime's accuracy on the whole
  test split, measured at export (manifest ``runtime_accuracy_full``);
  ``deploy_delta`` = accuracy - ``torch_accuracy`` (the fake-quant PyTorch accuracy on the same
  samples, from the manifest): what deployment cost, after distillation and quantization cost their share.
- ``size_mb``: size of the model file on disk, MB = 10**6 bytes.
- ``peak_rss_mb``: the process's peak resident memory (``getrusage`` ru_maxrss) while the bundle
  was loaded, evaluated and timed, interpreter and eval data included. On Linux the kernel's
  high-water mark is reset before loading each bundle (``peak_rss_scope`` = "bundle"); where
  that is impossible it is the whole process lifetime, earlier bundles included ("process").
  ``rss_increase_mb`` = VmRSS after the runs - VmRSS before loading the model (memory the loaded
  model keeps); ``peak_rss_increase_mb`` = peak - VmRSS before loading (what loading and running
  needed at most on top of what the process already held). Both need /proc (Linux), and both
  count new resident pages only: memory the allocator reuses from earlier, freed allocations of
  the same process (an earlier bundle's) is already resident, so later bundles can show less.

What the machine has bounds every run: at most as many intra-op threads as CPUs available to the
process (more are cut to that, said in the row's ``note``); at most ``MAX_TIMED_RUNS`` timed runs
whatever ``min_time_s`` asks; a batch whose input would take more than a quarter of the memory
available is ``skipped`` (``note`` says why). The settings' own bounds are those of the options
table (edgekd.config.options), checked by ``resolve_settings``.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..backends import get_backend, get_runner, host_facts, release
from ..bundle import (Bundle, BundleError, accuracy_source, available_memory, batched_logits, check_labels,
                      load_bundle, read_manifest)
from ..catalog import BenchSettings, Budgets, Profile, check_bench
from ..core.errors import ConfigError, EdgekdError
from ..core.registry import suggest
from .budgets import apply_budgets
from .memory import (MB, MemoryProbe, _proc_status_mb, available_cpus, peak_rss_mb, reset_peak_rss,  # noqa: F401
                     usable_threads)

ACCURACY_BATCH = 64  # batch used for accuracy when the model's batch dimension is dynamic
MAX_TIMED_RUNS = 1_000_000  # timed runs kept per row at most (8 MB of samples), whatever min_time_s asks
INPUT_MEMORY_SHARE = 4  # a batch's input may take at most 1/4 of the memory available


@dataclass
class Row:
    """One benchmark result: a bundle at one batch size. JSON keys are the field names."""

    bundle: str
    path: str
    status: str = "ok"
    source: str = "measured"
    target: str | None = None
    backend: str | None = None
    format: str | None = None
    weight_bits: int | None = None
    act_bits: int | None = None
    batch_size: int | None = None
    size_mb: float | None = None
    accuracy: float | None = None
    accuracy_source: str | None = None  # "eval sample (N of M test images)" or "test split (N images)"
    accuracy_full: float | None = None  # the whole test split through the runtime, at export
    torch_accuracy: float | None = None
    deploy_delta: float | None = None
    teacher_accuracy: float | None = None
    student_float_accuracy: float | None = None
    eval_samples: int | None = None
    latency_ms: dict | None = None
    timed_runs: int | None = None
    throughput_ips: float | None = None
    peak_rss_mb: float | None = None
    peak_rss_scope: str | None = None
    rss_increase_mb: float | None = None
    peak_rss_increase_mb: float | None = None
    budget: dict | None = None
    profile: str | None = None
    settings: dict | None = None
    environment: dict = field(default_factory=dict)
    error: str | None = None
    note: str | None = None
    device_timing: dict | None = None  # runtimes that can time the device alone (TensorRT: GPU compute)
    estimate: dict | None = None  # source "estimated" rows: the model of the hardware they come from

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- statistics ---------------------------------------------------------------------------------------

def time_runs(fn: Callable[[], Any], warmup: int, warmup_s: float, iterations: int, min_time_s: float,
              clock: Callable[[], float] = time.perf_counter) -> np.ndarray:
    """Seconds taken by each timed call of ``fn`` (see the module docstring for the rule); at most
    MAX_TIMED_RUNS of them."""
    start = clock()
    done = 0
    while done < warmup or clock() - start < warmup_s:
        fn()
        done += 1
    samples = array("d")
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = clock()
        while (len(samples) < iterations or clock() - start < min_time_s) and len(samples) < MAX_TIMED_RUNS:
            t0 = clock()
            fn()
            samples.append(clock() - t0)
    finally:
        if enabled:
            gc.enable()
    return np.asarray(samples, dtype=np.float64)


def latency_stats(seconds: Sequence[float]) -> dict:
    """min, mean, p50, p90, p95, p99, std of per-call times, in milliseconds.

    Percentiles use numpy's default linear interpolation; std is the population standard
    deviation (ddof=0)."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("no timings")
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    return {"min": float(ms.min()), "mean": float(ms.mean()), "p50": float(p50), "p90": float(p90),
            "p95": float(p95), "p99": float(p99), "std": float(ms.std())}


def throughput_ips(batch: int, mean_ms: float) -> float:
    """Images per second of back-to-back calls: batch / mean latency in seconds."""
    return batch / (mean_ms / 1e3)


def top1_accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """Fraction of samples whose highest logit is the label."""
    return float(np.mean(np.argmax(logits, axis=1) == y))


def resolve_settings(profile: Profile | None = None, **overrides) -> BenchSettings:
    """The profile's bench settings (or the defaults) with the non-None ``overrides`` applied, checked
    against the options table's bounds (a ConfigError naming the option otherwise). ``batch_sizes``
    may be given as any sequence; an empty one means "not given"."""
    settings = profile.bench if profile is not None else BenchSettings()
    known = [f.name for f in dataclasses.fields(BenchSettings)]
    for key in overrides:
        if key not in known:
            raise ConfigError(f"unknown bench setting {key!r}{suggest(key, known)}", f"choose from: {', '.join(known)}")
    given = {k: v for k, v in overrides.items() if v is not None and v != ()}
    if "batch_sizes" in given:
        given["batch_sizes"] = tuple(given["batch_sizes"])
    settings = dataclasses.replace(settings, **given)
    check_bench(settings, "")
    return settings


def _input_too_big(batch: int, bundle: Bundle) -> str | None:
    """Why a batch of ``batch`` eval samples cannot be built here (over a share of the memory
    available), or None."""
    need = batch * bundle.x[:1].nbytes
    free = available_memory()
    if free is None or need <= free / INPUT_MEMORY_SHARE:
        return None
    return (f"batch size {batch} needs {need / MB:.0f} MB of input, over 1/{INPUT_MEMORY_SHARE} of the "
            f"{free / MB:.0f} MB of memory available here")


def _add_note(row: Row, text: str | None) -> None:
    if text:
        row.note = f"{row.note}; {text}" if row.note else text


# --- benchmarking -------------------------------------------------------------------------------------

def _message(e: BaseException) -> str:
    return e.one_line() if isinstance(e, EdgekdError) else f"{type(e).__name__}: {e}"


def _manifest_fields(manifest: dict) -> dict:
    keys = ("target", "backend", "format", "weight_bits", "act_bits", "torch_accuracy", "teacher_accuracy",
            "student_float_accuracy")
    return {k: manifest.get(k) for k in keys}


def _error_row(path: Path, e: BaseException, manifest: dict | None = None) -> Row:
    """An ``error`` row showing what the manifest (when readable) says about the bundle."""
    name = str((manifest or {}).get("name") or path.name)
    row = Row(bundle=name, path=str(path), status="error", error=_message(e), environment=host_facts())
    if manifest is not None:
        for key, value in _manifest_fields(manifest).items():
            setattr(row, key, value)
    return row


def _check_io(bundle: Bundle, info: dict, logits: np.ndarray) -> None:
    expected = bundle.manifest["input_name"]
    if info["name"] != expected:
        raise BundleError(f"manifest input_name {expected!r} is not the model's first input {info['name']!r}")
    classes = len(bundle.manifest["classes"])
    if logits.ndim != 2 or logits.shape[1] != classes:
        raise BundleError(f"the model outputs shape {list(logits.shape)}, expected [N, {classes}] "
                          f"for the manifest's {classes} classes")


def _base_row(bundle: Bundle, logits: np.ndarray, settings: BenchSettings, profile: str | None) -> Row:
    accuracy = top1_accuracy(logits, bundle.y)
    row = Row(bundle=bundle.name, path=str(bundle.path), **_manifest_fields(bundle.manifest),
              size_mb=bundle.model_path.stat().st_size / MB, accuracy=accuracy, eval_samples=len(bundle.y),
              accuracy_source=accuracy_source(len(bundle.y), bundle.manifest.get("test_samples")),
              accuracy_full=bundle.manifest.get("runtime_accuracy_full"),
              profile=profile, settings=dataclasses.asdict(settings))
    if row.torch_accuracy is not None:
        row.deploy_delta = accuracy - row.torch_accuracy
    return row


def _batch_row(base: Row, runner, handle, bundle: Bundle, batch: int, settings: BenchSettings,
               fixed: int | None) -> Row:
    row = dataclasses.replace(base, batch_size=batch)
    if fixed is not None and fixed != batch:
        row.status = "skipped"
        row.note = (f"the model has a fixed batch dimension of {fixed}; "
                    f"re-export with a dynamic batch axis to bench batch size {batch}")
        return row
    too_big = _input_too_big(batch, bundle)
    if too_big:
        row.status, row.note = "skipped", f"{too_big}; bench a smaller --batch-size"
        return row
    xb = np.ascontiguousarray(np.resize(bundle.x, (batch,) + bundle.x.shape[1:]))
    seconds = time_runs(runner.timed_call(handle, xb), settings.warmup, settings.warmup_s,
                        settings.iterations, settings.min_time_s)
    row.latency_ms = latency_stats(seconds)
    row.timed_runs = len(seconds)
    row.throughput_ips = throughput_ips(batch, row.latency_ms["mean"])
    if hasattr(runner, "device_timing"):  # e.g. TensorRT: GPU compute alone, without the copies
        row.device_timing = runner.device_timing(handle, xb, settings.iterations)
    return row


def _measure(bundle: Bundle, settings: BenchSettings, profile: str | None) -> list[Row]:
    runner = get_runner(bundle.manifest["backend"])
    threads, threads_note = usable_threads(settings.threads)
    memory = MemoryProbe().start()
    handle = runner.load(bundle.model_path, threads, bundle.manifest.get("backend_options") or {})
    try:
        return _measure_loaded(bundle, settings, profile, runner, handle, memory, threads_note)
    finally:
        release(runner, handle)


def _measure_loaded(bundle: Bundle, settings: BenchSettings, profile: str | None, runner, handle,
                    memory: MemoryProbe, threads_note: str | None) -> list[Row]:
    info = runner.input_info(handle)
    fixed = info["fixed_batch"]
    if fixed is not None:
        valid = isinstance(fixed, int) and not isinstance(fixed, bool) and fixed > 0
        problem = _input_too_big(fixed, bundle) if valid else "not a positive integer"
        if problem:
            raise BundleError(f"the model's fixed batch dimension {fixed} cannot be run here: {problem}",
                              "re-export the bundle with a dynamic batch axis")
    logits = batched_logits(runner, handle, bundle.x, fixed or ACCURACY_BATCH, fixed is not None)
    _check_io(bundle, info, logits)
    check_labels(bundle)
    base = _base_row(bundle, logits, settings, profile)
    rows = []
    for batch in settings.batch_sizes:
        try:
            rows.append(_batch_row(base, runner, handle, bundle, batch, settings, fixed))
        except Exception as e:  # one batch size failing must not hide the others
            rows.append(dataclasses.replace(base, status="error", batch_size=batch, error=_message(e)))
    measured = memory.result()
    environment = runner.describe_environment(handle)
    for row in rows:
        row.environment = environment
        _add_note(row, threads_note)
        _add_note(row, environment.get("fallback"))  # e.g. the execution provider the target asks for is missing
        if row.status != "error":
            for key, value in measured.items():
                setattr(row, key, value)
    return rows


def _estimated_rows(bundle: Bundle, est: dict | None, settings: BenchSettings, profile: str | None) -> list[Row]:
    """Rows of a bundle whose backend does not run here (an FPGA): speed comes from the backend's
    estimate ``est`` for ``profile``, accuracy from export's run of the reference executor; every
    row says ``source: "estimated"``. Batch b: b images streamed back to back, b / throughput."""
    base = Row(bundle=bundle.name, path=str(bundle.path), source="estimated", **_manifest_fields(bundle.manifest),
               size_mb=bundle.model_path.stat().st_size / MB, accuracy=bundle.manifest.get("runtime_accuracy"),
               eval_samples=(bundle.manifest.get("parity") or {}).get("n"), profile=profile,
               accuracy_source=accuracy_source(len(bundle.y), bundle.manifest.get("test_samples")),
               accuracy_full=bundle.manifest.get("runtime_accuracy_full"),
               settings=dataclasses.asdict(settings), environment=host_facts())
    if base.torch_accuracy is not None and base.accuracy is not None:
        base.deploy_delta = base.accuracy - base.torch_accuracy
    if est is None:
        note = (f"the bundle has no estimate for profile {profile}" if profile else "the bundle has no estimate")
        return [dataclasses.replace(base, status="skipped", batch_size=b, note=note) for b in settings.batch_sizes]
    _check_estimate(est)
    check_labels(bundle)
    rows = []
    for batch in settings.batch_sizes:
        row = dataclasses.replace(base, batch_size=batch, estimate=est,
                                  note=f"estimated for {est.get('profile')}: {est.get('method', 'heuristic')}")
        if est.get("throughput_ips"):
            ms = batch / est["throughput_ips"] * 1e3
            row.latency_ms = {k: ms for k in ("min", "mean", "p50", "p90", "p95", "p99")} | {"std": 0.0}
            row.throughput_ips = est["throughput_ips"]
        rows.append(row)
    return rows


def _check_estimate(est: dict) -> None:
    """The estimate's speed must be a positive finite number (else no row could be called ok), and
    every other number in it (resources, counts, clock) finite and not negative."""
    for key, value in est.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        positive = key in ("throughput_ips", "latency_ms")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise BundleError(f"the bundle's estimate for {est.get('profile')} has {key} {value!r}, which is not "
                              f"a {'positive' if positive else 'non-negative'} finite number", "re-export the bundle")
    for key in ("throughput_ips", "latency_ms"):
        if est.get(key) is not None and (not isinstance(est[key], (int, float)) or isinstance(est[key], bool)):
            raise BundleError(f"the bundle's estimate for {est.get('profile')} has {key} {est[key]!r}, which is not "
                              "a positive finite number", "re-export the bundle")


def bench_bundle(path: Path, settings: BenchSettings, budgets: Budgets | None = None,
                 profile: str | None = None) -> list[Row]:
    """Rows for one bundle, one per batch size; any failure becomes an ``error`` row."""
    path = Path(path)
    manifest = None
    try:
        manifest = read_manifest(path)
        backend = get_backend(manifest["backend"])
        if backend.estimated:
            est = backend.estimate(manifest, profile)
            return [apply_budgets(r, budgets)
                    for r in _estimated_rows(load_bundle(path, manifest), est, settings, profile)]
        rows = _measure(load_bundle(path, manifest), settings, profile)
    except Exception as e:
        return [_error_row(path, e, manifest)]
    return [apply_budgets(row, budgets) for row in rows]


def bench_bundles(paths: Sequence[Path], settings: BenchSettings, budgets: Budgets | None = None,
                  profile: str | None = None, progress: Callable[[Path], None] | None = None) -> list[Row]:
    """Rows for every bundle in ``paths``, in order. Failures are isolated per bundle.
    ``progress`` (optional) is called with each path before it is benchmarked."""
    rows: list[Row] = []
    for path in paths:
        if progress is not None:
            progress(Path(path))
        rows.extend(bench_bundle(path, settings, budgets, profile))
    return rows


def exit_code(rows: Sequence[Row], strict: bool) -> int:
    """0, or with ``strict`` 1 when any row's status is not ``ok`` (fail, error or skipped)."""
    return 1 if strict and any(row.status != "ok" for row in rows) else 0
