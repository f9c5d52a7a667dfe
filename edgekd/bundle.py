"""A bundle: what ``edgekd export`` writes and ``edgekd bench`` reads, and how its files are checked.

A bundle folder holds the model artifact, ``manifest.json`` (the contract: target, backend, bits,
input shape, classes, normalization, accuracies, parity, and a sha256 per file), ``eval.npz``
(preprocessed samples and labels, so accuracy is measured on the device without torch) and what
the backend adds. This module is the one place that reads and verifies bundles, runs all of an
array through a runtime in batches, and compares a runtime's logits with PyTorch's (parity).
Needs only numpy: it runs on the device.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .core import jsonfile
from .core.errors import EdgekdError, MissingFileError, ParityError
from .core.fsutil import BUNDLES_DIR, latest, sha256_file

REQUIRED_KEYS = ("target", "backend", "format", "model_file", "weight_bits", "act_bits", "input_shape",
                 "input_name", "classes", "normalization", "torch_accuracy", "parity", "files",
                 "edgekd_version")


class BundleError(EdgekdError):
    """A bundle that is incomplete, corrupt, or modified after export."""


@dataclass
class Bundle:
    """A verified bundle: manifest, the model file to run, and the eval samples."""

    path: Path
    name: str
    manifest: dict
    model_path: Path
    x: np.ndarray
    y: np.ndarray


def resolve_bundles(paths: Sequence[str | Path]) -> list[Path]:
    """The bundle directories to bench: those given (a manifest.json path counts as its folder),
    else the most recent one under ``bundles/``. Paths that do not exist are a user error."""
    if not paths:
        found = latest(BUNDLES_DIR, "manifest.json")
        if found is None:
            raise MissingFileError(f"no bundle found under {BUNDLES_DIR}/",
                                   "run `edgekd export` first, or pass a bundle directory")
        return [found]
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise MissingFileError(f"no such bundle: {', '.join(missing)}", "pass directories written by `edgekd export`")
    return [Path(p).parent if Path(p).name == "manifest.json" else Path(p) for p in paths]


def read_manifest(path: Path) -> dict:
    """manifest.json of bundle ``path`` with every required key present."""
    file = path / "manifest.json"
    if not file.is_file():
        raise BundleError(f"not a bundle: {path} has no manifest.json", "pass a directory written by `edgekd export`")
    try:
        manifest = jsonfile.read(file, MANIFEST_BYTES)
    except ValueError as e:  # not JSON, not UTF-8, too large, nested too deeply
        raise BundleError(f"corrupt bundle: {file} is not valid JSON ({e})", "re-export the bundle") from None
    except OSError as e:
        raise BundleError(f"cannot read {file}: {e.strerror or e}", "check the bundle's permissions") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"corrupt bundle: {file} is not a JSON object", "re-export the bundle")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"incomplete bundle: {file} lacks {', '.join(missing)}", "re-export the bundle")
    _check_manifest_types(manifest, file)
    return manifest


def _plain_name(name) -> bool:
    """A file name inside the bundle folder (no directories, no '..', not absolute)."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


STRING_KEYS = ("target", "backend", "format", "model_file", "input_name")
NUMBER_KEYS = ("torch_accuracy", "teacher_accuracy", "student_float_accuracy", "runtime_accuracy",
               "distill_student_accuracy", "runtime_accuracy_full", "torch_accuracy_full")  # each a number or null
# the values a manifest field may take (checked when present and not null): (low, high) inclusive
RANGES = {**{k: (0.0, 1.0) for k in NUMBER_KEYS}, "weight_bits": (1, 32), "act_bits": (1, 32),
          "test_samples": (1, 10**9), "opset": (1, 100)}
PARITY_RANGES = {"n": (0, 10**9), "top1_agreement": (0.0, 1.0), "max_abs_diff": (0.0, math.inf),
                 "mean_abs_diff": (0.0, math.inf), "runtime_accuracy": (0.0, 1.0), "torch_accuracy": (0.0, 1.0),
                 "disagreements": (0, 10**9)}
INT_KEYS = ("weight_bits", "act_bits", "test_samples", "opset", "parity.n", "parity.disagreements")
MANIFEST_BYTES = 64 << 20  # a manifest lists up to MAX_CLASSES class names: tens of MB at most
MAX_NAME = 200  # characters of a bundle's name (it is a table cell)
MAX_CLASSES = 1_000_000


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _out_of_range(key: str, value, low, high) -> str | None:
    """Why ``value`` is not a valid manifest ``key`` (a finite number in low..high), or None."""
    if value is None:
        return None
    integer = key in INT_KEYS
    if not _number(value) or (integer and not isinstance(value, int)):
        return f"{key} must be {'an integer' if integer else 'a number'} or null, got {value!r}"
    if isinstance(value, float) and math.isnan(value):
        return f"{key} must be a number, got NaN"
    if not low <= value <= high or (isinstance(value, float) and math.isinf(value)):
        bound = f">= {low:g}" if math.isinf(high) else f"between {low:g} and {high:g}"
        return f"{key} must be {bound}, got {value!r}"
    return None


def _range_problems(manifest: dict) -> list[str]:
    """Every field outside its range: bits, accuracies (fractions), counts, parity, name, classes."""
    found = [_out_of_range(k, manifest.get(k), *r) for k, r in RANGES.items()]
    found += [_out_of_range(f"parity.{k}", manifest["parity"].get(k), *r) for k, r in PARITY_RANGES.items()]
    name = manifest.get("name")
    if name is not None and not (isinstance(name, str) and len(name) <= MAX_NAME):
        found.append(f"name must be a string of at most {MAX_NAME} characters, got {str(name)[:40]!r}")
    classes = manifest["classes"]
    if isinstance(classes, list) and len(classes) > MAX_CLASSES:
        found.append(f"classes lists {len(classes)} names, more than {MAX_CLASSES}")
    estimates = manifest.get("fpga_estimates")
    if estimates is not None and not (isinstance(estimates, dict)
                                      and all(isinstance(v, dict) for v in estimates.values())):
        found.append("fpga_estimates must map profile names to tables")
    options = manifest.get("backend_options")
    if options is not None and not isinstance(options, dict):
        found.append(f"backend_options must be a table, got {options!r}")
    return [p for p in found if p]


def _check_manifest_types(manifest: dict, file: Path) -> None:
    problems = [f"{k} must be a string, got {manifest[k]!r}" for k in STRING_KEYS if not isinstance(manifest[k], str)]
    problems += [f"{k} must be a number or null, got {manifest[k]!r}" for k in NUMBER_KEYS
                 if manifest.get(k) is not None and not _number(manifest[k])]
    problems += [f"{k} must be an integer or null, got {manifest[k]!r}" for k in ("weight_bits", "act_bits")
                 if manifest[k] is not None and not (_number(manifest[k]) and isinstance(manifest[k], int))]
    problems += [f"{k} must be a table, got {manifest[k]!r}" for k in ("normalization", "parity")
                 if not isinstance(manifest[k], dict)]
    if problems:  # the checks below read these fields
        raise BundleError(f"corrupt bundle: {file}: {'; '.join(problems)}"[:600], "re-export the bundle")
    problems = _range_problems(manifest)
    for key in ("model_file", "reference_file"):  # files edgekd opens by these names (reference: compile)
        if key in manifest and not _plain_name(manifest[key]):
            problems.append(f"{key} {str(manifest[key])[:80]!r} is not a file name inside the bundle")
    files = manifest["files"]
    if not isinstance(files, dict) or not all(_plain_name(k) and isinstance(v, str) for k, v in files.items()):
        problems.append("files must map file names inside the bundle to sha256 hex digests")
    shape = manifest["input_shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
        problems.append(f"input_shape must be a list of positive integers, got {shape!r}")
    if not isinstance(manifest["classes"], list) or not manifest["classes"]:
        problems.append("classes must be a non-empty list")
    if problems:
        raise BundleError(f"corrupt bundle: {file}: {'; '.join(problems)}"[:600], "re-export the bundle")


def verify_files(path: Path, manifest: dict) -> None:
    """Every file in manifest ``files`` exists with the recorded sha256; the model file and
    eval.npz must be among them. Raises BundleError naming every mismatch at once."""
    files = manifest["files"]
    problems = [f"{name} is not listed in manifest 'files'" for name in (manifest["model_file"], "eval.npz")
                if name not in files]
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(file) != digest:
            problems.append(f"{name} sha256 differs from the manifest")
    if problems:
        raise BundleError(f"bundle {path} was modified after export or is incomplete: {'; '.join(problems)}",
                          "re-export it with `edgekd export`")


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable, else free physical pages);
    None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _npy_bytes(data, key: str) -> int:
    """Bytes array ``key`` of an opened .npz takes once loaded, read from its header alone (a
    compressed member can expand to far more than the file's size)."""
    with data.zip.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, _, dtype = read(f)
    return int(np.prod(shape, dtype=object)) * dtype.itemsize


def _read_xy(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """x and y of eval.npz, refused before loading when they would take over half the memory available."""
    with np.load(file, allow_pickle=False) as data:
        need = sum(_npy_bytes(data, key) for key in ("x", "y"))
        free = available_memory()
        if free is not None and need * 2 > free:  # x is also converted to float32: room for a copy
            raise BundleError(f"corrupt bundle: {file} holds {need / 1e6:.0f} MB of samples, more than half of the "
                              f"{free / 1e6:.0f} MB of memory available here", "export with fewer --eval-samples")
        return data["x"], data["y"]


def load_eval(path: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    """eval.npz's ``x`` (float32, N x input_shape) and ``y`` (int64, N), checked against the manifest."""
    try:
        x, y = _read_xy(path / "eval.npz")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise BundleError(f"corrupt bundle: cannot read x and y from {path / 'eval.npz'} ({e})") from None
    shape = tuple(manifest["input_shape"])
    if x.ndim != len(shape) + 1 or x.shape[1:] != shape or y.shape != (len(x),) or len(x) == 0:
        raise BundleError(f"eval.npz holds x {list(x.shape)} and y {list(y.shape)}, expected "
                          f"x [N, {', '.join(map(str, shape))}] and y [N] with N > 0")
    if x.dtype.kind not in "fiub" or y.dtype.kind not in "iu":
        kind = "complex" if "c" in (x.dtype.kind, y.dtype.kind) else "other"
        raise BundleError(f"corrupt bundle: eval.npz holds x of type {x.dtype} and y of type {y.dtype} "
                          f"({kind} values); x must be real numbers and y integer labels", "re-export the bundle")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise BundleError(f"corrupt bundle: eval.npz x holds {int((~np.isfinite(x)).sum())} values that are not finite "
                          "(NaN or infinity)", "re-export the bundle")
    return x, y.astype(np.int64)


def check_labels(bundle: "Bundle") -> None:
    """Every eval.npz label names one of the manifest's classes (checked once the model is known to
    output that many): an accuracy over labels out of range would mean nothing."""
    classes = len(bundle.manifest["classes"])
    bad = bundle.y[(bundle.y < 0) | (bundle.y >= classes)]
    if bad.size:
        raise BundleError(f"corrupt bundle: eval.npz y holds {bad.size} labels out of range (e.g. {int(bad[0])}; "
                          f"the manifest has {classes} classes)", "re-export the bundle")


def load_bundle(path: Path, manifest: dict | None = None) -> Bundle:
    """Read and verify a bundle: manifest keys (unless ``manifest`` was read already), file
    hashes, eval arrays."""
    path = Path(path)
    manifest = manifest if manifest is not None else read_manifest(path)
    verify_files(path, manifest)
    x, y = load_eval(path, manifest)
    name = str(manifest.get("name") or path.name)
    return Bundle(path, name, manifest, path / manifest["model_file"], x, y)


def file_hashes(directory: Path, skip=("manifest.json",), keep=None) -> dict:
    """sha256 of the regular files of ``directory`` (not ``skip``; only ``keep``'s when given)."""
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir())
            if p.is_file() and not p.is_symlink() and p.name not in skip and (keep is None or p.name in keep)}


# --- running and comparing ------------------------------------------------------------------------

def batched_logits(runner, handle, x: np.ndarray, batch: int, fixed: bool) -> np.ndarray:
    """Run all of ``x`` through the runtime ``batch`` samples at a time. With a ``fixed`` batch
    dimension the last chunk is padded by repeating samples and the padding dropped."""
    outputs = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        n = len(chunk)
        if fixed and n < batch:
            chunk = np.resize(chunk, (batch,) + chunk.shape[1:])
        outputs.append(np.asarray(runner.run(handle, chunk))[:n])
    return np.concatenate(outputs)


def accuracy_source(n: int, total) -> str:
    """What an accuracy over a bundle's ``n`` eval samples stands for: a sample of the ``total`` test
    images (``test_samples`` in the manifest; bundles of earlier versions lack it) or all of them."""
    if isinstance(total, int) and not isinstance(total, bool) and total > n:
        return f"eval sample ({n} of {total} test images)"
    return f"test split ({n} images)"


def parity(reference: np.ndarray, runtime: np.ndarray, labels: np.ndarray) -> dict:
    """Agreement of the runtime's logits with PyTorch's on the same samples."""
    agree = reference.argmax(1) == runtime.argmax(1)
    return {"n": int(len(labels)), "top1_agreement": float(agree.mean()),
            "max_abs_diff": float(np.abs(reference - runtime).max()),
            "mean_abs_diff": float(np.abs(reference - runtime).mean()),
            "runtime_accuracy": float((runtime.argmax(1) == labels).mean()),
            "torch_accuracy": float((reference.argmax(1) == labels).mean()),
            "disagreements": int((~agree).sum())}


def check_parity(report: dict, tolerance, where: str) -> None:
    """Raise one ParityError listing every bound the artifact misses."""
    misses = []
    if not math.isfinite(report["max_abs_diff"]):
        misses.append("the runtime's logits are not all finite")
    if report["top1_agreement"] < tolerance.min_top1_agreement:
        misses.append(f"top-1 agreement {report['top1_agreement']:.4f} < {tolerance.min_top1_agreement}")
    if tolerance.max_abs_diff is not None and report["max_abs_diff"] > tolerance.max_abs_diff:
        misses.append(f"max abs diff {report['max_abs_diff']:.3g} > {tolerance.max_abs_diff}")
    if misses:
        raise ParityError(f"{where} does not match the PyTorch model on {report['n']} test samples: "
                          + "; ".join(misses), "retrain with the "
                          "target's conventions (distill --target)")
