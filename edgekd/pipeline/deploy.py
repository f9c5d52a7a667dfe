"""Deploy: a run directory -> a bundle for a target (export + compile + parity), and the on-device
compile step of runtimes whose artifacts are built where they run.

The walk of a target: the catalog loads it; ``export.onnx`` writes the student in the target's
flavour; the target's backend compiles it, runs it on the evaluation samples and adds its manifest
fields; ``bundle.parity`` compares the runtime's logits with PyTorch's. Nothing here knows which
backend it is talking to.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .. import __version__
from ..core import jsonfile
from ..core.errors import EdgekdError, IncompatibleError
from ..core.fsutil import BUNDLES_DIR, atomic_dir, check_output, write_json
from ..config import options as op
from .common import Log, quiet
from .evalset import DEFAULT_EVAL_SAMPLES, eval_arrays, full_accuracy, read_test_split


def export(run_dir: str | Path | None, target_name: str, out: Path | None = None, log: Log = quiet,
           overwrite: bool = False, student: str | None = None, trust_code: bool = False,
           float_model: bool = False, eval_samples: int = DEFAULT_EVAL_SAMPLES, data=None) -> dict:
    """Export, compile and validate a distilled student for a target; returns the manifest.

    ``eval_samples``: the bundle's eval.npz holds a seeded, stratified sample of at most this many
    test images (parity, on-device accuracy); the whole test split goes through the runtime once,
    here (pipeline.evalset). ``data``: the api.TorchData of a run whose data came from the Python API.

    ``out`` (default bundles/RUN-TARGET) obeys the output-path rule (core.fsutil.check_output;
    ``overwrite``), checked before anything is loaded; a run being written (locked by distill) is
    refused. ``student``: the architecture named again (a student built by ``module:callable``),
    or ``trust_code`` to build what the checkpoint names. ``float_model``: export the run's float student
    (``float.pt``) unquantized, flavour ``fp32``: the reference a quantized bundle is measured against."""
    import torch

    from .. import catalog
    from ..backends import get_backend
    from ..bundle import file_hashes
    from ..core.locks import check_unlocked
    from .distill import find_run, read_metrics  # torch: imported by export only, never by compile_bundle

    run_dir = find_run(run_dir)
    target = catalog.load_target(target_name)
    backend = get_backend(target.backend)
    if float_model and not backend.float_ok:
        raise IncompatibleError(f"{backend.title} targets take quantized models only; --float exports an fp32 model",
                                "export the fp32 reference for an ONNX Runtime target (e.g. --target cpu)")
    out = Path(out) if out else BUNDLES_DIR / f"{run_dir.name}-{target.name}{'-fp32' if float_model else ''}"
    check_output(out, "bundle", [run_dir], overwrite)
    check_unlocked(run_dir)
    metrics = read_metrics(run_dir)
    model, meta = _model_to_export(run_dir, target, backend, float_model, student, trust_code)
    op.check("eval_samples", eval_samples)
    data = read_test_split(meta, data)
    x, y = eval_arrays(data, eval_samples, meta["seed"])
    with torch.no_grad():
        reference = torch.cat([model(torch.from_numpy(x[i: i + 512])) for i in range(0, len(x), 512)]).numpy()
    with atomic_dir(out) as tmp:
        manifest = _build_bundle(tmp, out.name, model, "fp32" if float_model else target.flavour, target, backend,
                                 (x, y, reference), data, log)
        manifest = manifest_base(target, meta, metrics) | manifest | {
            "run_dir": str(run_dir), "transform": meta.get("transform"), "data_options": meta.get("data_options"),
            "init_weights": meta.get("init_weights"), "files": file_hashes(tmp),
            "layers": None if float_model else _layers(model)}
        write_json(tmp / "manifest.json", manifest)
    return manifest | {"bundle_dir": str(out)}


def _model_to_export(run_dir: Path, target, backend, float_model: bool, student, trust_code: bool):
    """The run's quantized student (or, ``float_model``, its float one) and its metadata, after the
    backend has checked the run's quantizer conventions."""
    from .distill import load_float, load_student

    if float_model:
        return load_float(run_dir, student, trust_code)
    model, meta = load_student(run_dir, student, trust_code)
    reason = backend.check_run(meta["quant"], target)
    if reason:
        raise IncompatibleError(f"{run_dir} was trained with conventions {target.name} does not run: {reason}",
                                f"retrain it for this target: {retrain_command(run_dir, target.name)}")
    return model, meta


def _build_bundle(tmp: Path, name: str, model, flavour: str, target, backend, samples, data, log: Log) -> dict:
    """Export ``model`` into the staging folder ``tmp``, compile it, check it against PyTorch on the
    eval samples (x, y, reference logits), measure the whole test split; the manifest's fields."""
    import numpy as np
    import torch

    from ..backends import ExportContext
    from ..bundle import check_parity, parity
    from ..export.onnx import export_onnx

    x, y, reference = samples
    started = time.perf_counter()
    export_onnx(model, flavour, torch.from_numpy(x[:1]), tmp / "model.onnx", target.opset)
    ctx = ExportContext(tmp, name, target, reference, _profiles_listing(target), log)
    compiled = backend.compile(tmp / "model.onnx", ctx)
    log(f"exported {flavour} ONNX and compiled for {target.backend} in {time.perf_counter() - started:.1f}s")
    report = parity(reference, backend.infer(compiled.artifact, x, target.options), y)
    log(f"parity on {report['n']} test samples: top-1 agreement {report['top1_agreement']:.4f}, "
        f"max abs diff {report['max_abs_diff']:.3g}")
    check_parity(report, target.tolerance, f"the {target.name} artifact")
    full = full_accuracy(model, backend, compiled.artifact, target.options, data.test, report, log)
    np.savez_compressed(tmp / "eval.npz", x=x, y=y)
    return _common_extras(target) | backend.manifest_extras(ctx) | {
        "name": name, "model_file": compiled.artifact.name,
        "torch_accuracy": report["torch_accuracy"], "runtime_accuracy": report["runtime_accuracy"],
        "parity": {k: report[k] for k in ("n", "top1_agreement", "max_abs_diff", "mean_abs_diff", "disagreements")},
        "fusion": compiled.reports.get("fusion"), **full}


def _layers(model) -> list[dict]:
    """Per Conv / Linear layer of the quantized student: its resolved weight and activation bits."""
    from ..quant import layerbits

    return layerbits.table(model)


def retrain_command(run_dir: Path, target: str) -> str:
    """The ``edgekd distill`` line that trains the run again with ``target``'s conventions."""
    try:
        recipe = jsonfile.read(Path(run_dir) / "recipe.json", 1 << 20)
    except (OSError, ValueError):  # unreadable, not JSON, too large or nested too deeply: no recipe
        recipe = {}
    parts = ["edgekd distill"]
    for key in ("data", "student", "weight_bits", "act_bits", "method", "epochs", "float_epochs"):
        if isinstance(recipe.get(key), (str, int)) and not isinstance(recipe.get(key), bool):
            parts.append(f"--{key.replace('_', '-')} {recipe[key]}")
    rules = recipe.get("layer_bits") if isinstance(recipe, dict) else None  # per-layer bits, as --layer-bits takes them
    if isinstance(rules, list):
        parts += [f"--layer-bits '{r}'" for r in rules if isinstance(r, str) and "'" not in r]
    return " ".join(parts + [f"--target {target}", f"--out {Path(run_dir).name}-{target}"])


def _profiles_listing(target) -> list:
    """The device profiles that list ``target`` (backends estimate for them, e.g. FPGAs)."""
    from .. import catalog

    return [p for p in catalog.list_profiles() if target.name in p.targets]


def _common_extras(target) -> dict:
    return {"backend_options": dict(target.options),
            "tolerance": {"min_top1_agreement": target.tolerance.min_top1_agreement,
                          "max_abs_diff": target.tolerance.max_abs_diff}}


def manifest_base(target, run_meta: dict, metrics: dict) -> dict:
    spec = run_meta.get("quant")  # None: the float student (flavour fp32)
    return {"name": "", "target": target.name, "backend": target.backend, "format": target.flavour if spec else "fp32",
            "opset": target.opset, "weight_bits": spec["weight_bits"] if spec else 32,
            "act_bits": spec["act_bits"] if spec else 32, "quant": spec, "student": run_meta["arch"], "dataset": run_meta["dataset"],
            "input_shape": list(run_meta["input_shape"]), "input_name": "input", "classes": run_meta["classes"],
            "normalization": run_meta["normalization"], "torch_accuracy": None,
            "teacher_accuracy": metrics.get("teacher_accuracy"),
            "student_float_accuracy": metrics.get("student_float_accuracy"),
            "distill_student_accuracy": metrics.get("student_accuracy"), "edgekd_version": __version__}


# --- compile (on the device) ---------------------------------------------------------------------

def compile_bundle(bundle_dir: str | Path | None, profile: str | None = None, log: Log = quiet) -> dict:
    """Build a bundle's artifact on this device where its backend needs that (TensorRT engines), check
    it against the PyTorch logits saved at export, and update the manifest. Never imports torch."""
    from ..backends import backend_names, get_backend
    from ..bundle import check_parity, read_manifest, resolve_bundles, verify_files
    from ..catalog import Tolerance, load_profile

    path = resolve_bundles([bundle_dir] if bundle_dir else [])[0]
    manifest = read_manifest(path)
    backend = get_backend(manifest["backend"])
    if not backend.builds_on_device:
        builders = " / ".join(get_backend(n).title for n in backend_names() if get_backend(n).builds_on_device)
        raise EdgekdError(f"{path} is a {backend.title} bundle; only {builders} bundles are compiled on the device",
                          "bench it directly with `edgekd bench`")
    manifest["model_file"] = "model.onnx"  # build from the ONNX graph even if an artifact exists
    verify_files(path, manifest)
    _check_compile_inputs(path, manifest, backend)
    prof = load_profile(profile) if profile else None
    before = _entries(path)
    updates = backend.compile_on_device(path, manifest, prof, log)
    report = updates.get("parity") or updates.get("engine_parity")
    if report is not None:
        log(f"engine parity on {report['n']} samples: top-1 agreement {report['top1_agreement']:.4f}, "
            f"max abs diff {report['max_abs_diff']:.3g}")
        minimum = (manifest.get("tolerance") or {}).get("min_top1_agreement", 0.99)
        check_parity(report, Tolerance(min_top1_agreement=minimum), f"the {manifest['backend']} artifact")
    manifest |= updates | {"files": _compiled_files(path, manifest["files"], before)}
    write_json(path / "manifest.json", manifest)
    return manifest | {"bundle_dir": str(path)}


def _check_compile_inputs(path: Path, manifest: dict, backend) -> None:
    """What compile would write is edgekd's: the manifest's backend options pass the backend's schema
    (a timing cache named ``../x`` is never written outside the bundle), and no file compile writes
    (``backend.device_files``) is there unless the manifest lists it (a user's file is never replaced)."""
    from ..catalog.schema import check_options

    options = manifest.get("backend_options") or {}
    check_options(options, manifest["backend"], f"{path / 'manifest.json'} backend_options")
    for name in backend.device_files:
        if os.path.lexists(path / name) and name not in manifest["files"]:
            raise EdgekdError(f"{path} holds {name}, which edgekd did not write (compile would replace it)",
                              f"move {name} away and compile again")


def _entries(path: Path) -> set:
    return set(os.listdir(path))


def _compiled_files(path: Path, listed: dict, before: set) -> dict:
    """The manifest's ``files`` after compile: what it listed and what compile wrote (regular files
    that were not there before it, and its ``device_files``), hashed. A file of the user's that was in
    the folder before is never listed: listing it would make edgekd delete it with the bundle."""
    from ..bundle import file_hashes
    from ..core.staging import STAGED

    new = {n for n in _entries(path) - before if not STAGED.fullmatch(n)}
    return file_hashes(path, keep=set(listed) | new)
