"""Deploy: a run directory -> a bundle for a target (export + compile + parity), and the on-device
compile step of runtimes whose artifacts are built where they run.

The walk of a target: the catalog loads it; ``export.onnx`` writes the student in the target's
flavour; the target's backend compiles it, runs it on the evaluation samples and adds its manifest
fields; ``bundle.parity`` compares the runtime's logits with PyTorch's. Nothing here knows which
backend it is talking to.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import __version__
from ..core.errors import EdgekdError, IncompatibleError
from ..core.fsutil import BUNDLES_DIR, atomic_dir, check_output, write_json
from .common import Log, quiet
from .distill import find_run, load_student, read_metrics


def export(run_dir: str | Path | None, target_name: str, out: Path | None = None, log: Log = quiet,
           overwrite: bool = False, student: str | None = None, trust_code: bool = False) -> dict:
    """Export, compile and validate a distilled student for a target; returns the manifest.

    ``out`` (default bundles/RUN-TARGET) obeys the output-path rule (core.fsutil.check_output;
    ``overwrite``), checked before anything is loaded; a run being written (locked by distill) is
    refused. ``student``: the architecture named again (a student built by ``module:callable``),
    or ``trust_code`` to build what the checkpoint names."""
    import numpy as np
    import torch

    from .. import catalog
    from ..backends import ExportContext, get_backend
    from ..bundle import check_parity, file_hashes, parity
    from ..core.locks import check_unlocked
    from ..export.onnx import export_onnx

    run_dir = find_run(run_dir)
    target = catalog.load_target(target_name)
    backend = get_backend(target.backend)
    out = Path(out) if out else BUNDLES_DIR / f"{run_dir.name}-{target.name}"
    check_output(out, "bundle", [run_dir], overwrite)
    check_unlocked(run_dir)
    metrics = read_metrics(run_dir)
    qmodel, meta = load_student(run_dir, student, trust_code)
    reason = backend.check_run(meta["quant"], target)
    if reason:
        raise IncompatibleError(f"{run_dir} was trained with conventions {target.name} does not run: {reason}",
                                f"retrain it for this target: {retrain_command(run_dir, target.name)}")
    x, y = _eval_data(meta)
    with torch.no_grad():
        reference = torch.cat([qmodel(torch.from_numpy(x[i: i + 512])) for i in range(0, len(x), 512)]).numpy()
    with atomic_dir(out) as tmp:
        started = time.perf_counter()
        export_onnx(qmodel, target.flavour, torch.from_numpy(x[:1]), tmp / "model.onnx", target.opset)
        ctx = ExportContext(tmp, out.name, target, reference, _profiles_listing(target), log)
        compiled = backend.compile(tmp / "model.onnx", ctx)
        log(f"exported {target.flavour} ONNX and compiled for {target.backend} in {time.perf_counter() - started:.1f}s")
        report = parity(reference, backend.infer(compiled.artifact, x, target.options), y)
        log(f"parity on {report['n']} test samples: top-1 agreement {report['top1_agreement']:.4f}, "
            f"max abs diff {report['max_abs_diff']:.3g}")
        check_parity(report, target.tolerance, f"the {target.name} artifact")
        np.savez_compressed(tmp / "eval.npz", x=x, y=y)
        manifest = manifest_base(target, meta, metrics) | _common_extras(target) | backend.manifest_extras(ctx) | {
            "name": out.name, "model_file": compiled.artifact.name, "run_dir": str(run_dir),
            "torch_accuracy": report["torch_accuracy"], "runtime_accuracy": report["runtime_accuracy"],
            "parity": {k: report[k] for k in ("n", "top1_agreement", "max_abs_diff", "mean_abs_diff", "disagreements")},
            "fusion": compiled.reports.get("fusion"), "files": file_hashes(tmp)}
        write_json(tmp / "manifest.json", manifest)
    return manifest | {"bundle_dir": str(out)}


def retrain_command(run_dir: Path, target: str) -> str:
    """The ``edgekd distill`` line that trains the run again with ``target``'s conventions."""
    try:
        recipe = json.loads((Path(run_dir) / "recipe.json").read_text())
    except (OSError, ValueError):
        recipe = {}
    parts = ["edgekd distill"]
    for key in ("data", "student", "weight_bits", "act_bits", "method", "epochs", "float_epochs"):
        if isinstance(recipe.get(key), (str, int)) and not isinstance(recipe.get(key), bool):
            parts.append(f"--{key.replace('_', '-')} {recipe[key]}")
    return " ".join(parts + [f"--target {target}", f"--out {Path(run_dir).name}-{target}"])


def _eval_data(meta: dict):
    """The run's test split, preprocessed as at training time (its normalization must still hold)."""
    from ..data import load_dataset

    data = load_dataset(meta["dataset"], seed=meta["seed"])
    if [data.mean, data.std] != [meta["normalization"]["mean"], meta["normalization"]["std"]]:
        raise EdgekdError(f"the dataset {meta['dataset']} no longer matches the run's normalization",
                          "export on the machine and data the student was distilled with")
    return data.test.x, data.test.y


def _profiles_listing(target) -> list:
    """The device profiles that list ``target`` (backends estimate for them, e.g. FPGAs)."""
    from .. import catalog

    return [p for p in catalog.list_profiles() if target.name in p.targets]


def _common_extras(target) -> dict:
    return {"backend_options": dict(target.options),
            "tolerance": {"min_top1_agreement": target.tolerance.min_top1_agreement,
                          "max_abs_diff": target.tolerance.max_abs_diff}}


def manifest_base(target, run_meta: dict, metrics: dict) -> dict:
    spec = run_meta["quant"]
    return {"name": "", "target": target.name, "backend": target.backend, "format": target.flavour,
            "opset": target.opset, "weight_bits": spec["weight_bits"], "act_bits": spec["act_bits"],
            "quant": spec, "student": run_meta["arch"], "dataset": run_meta["dataset"],
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
    from ..bundle import check_parity, file_hashes, read_manifest, resolve_bundles, verify_files
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
    prof = load_profile(profile) if profile else None
    updates = backend.compile_on_device(path, manifest, prof, log)
    report = updates.get("parity") or updates.get("engine_parity")
    if report is not None:
        log(f"engine parity on {report['n']} samples: top-1 agreement {report['top1_agreement']:.4f}, "
            f"max abs diff {report['max_abs_diff']:.3g}")
        minimum = (manifest.get("tolerance") or {}).get("min_top1_agreement", 0.99)
        check_parity(report, Tolerance(min_top1_agreement=minimum), f"the {manifest['backend']} artifact")
    manifest |= updates | {"files": file_hashes(path)}
    write_json(path / "manifest.json", manifest)
    return manifest | {"bundle_dir": str(path)}
