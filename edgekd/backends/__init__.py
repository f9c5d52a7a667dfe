"""Runtime backends: one module per runtime, each owning everything particular to it.

A backend is an object with the ``Backend`` interface below: the export flavours it takes, the
schema of its target options (the catalog validates ``[options]`` through it), the compile step
run at export, how export runs the artifact for parity, the manifest fields it adds, how bench
loads and times a bundle (its ``Runner``), what it reports about the environment, what explain reads
at every layer (``run_tapped``), and, where the runtime must build on the device itself,
``compile_on_device``. Nothing outside this package
branches on a backend's name: adding a runtime is one module, one target file and its tests, and
one ``register_backend`` call (the built-in ones are registered below by module path, so that a
backend's runtime package is imported only when a bundle asks for it: ``edgekd bench`` on a
Raspberry Pi imports onnxruntime and nothing heavier, and a missing package fails with a one-line
``pip install 'edgekd[EXTRA]'`` hint).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from ..core.errors import EdgekdError, MissingExtraError
from ..core.registry import unknown
from .host import host_facts  # noqa: F401  (re-exported: every runner describes the host)

Log = Callable[[str], None]


@dataclass(frozen=True)
class Option:
    """One target option of a backend: its type, allowed values and what it does."""

    kind: type | tuple
    help: str
    choices: tuple = ()
    lo: float | None = None
    hi: float | None = None
    file_name: bool = False  # a str naming a file written next to the artifact: a plain name, no folders


class Runner(Protocol):
    """What bench and export need from a runtime. ``handle`` is the runtime's loaded model. A runner
    that holds device resources (memory, streams) also has ``unload(handle)``: see ``release``."""

    name: str

    def load(self, model_path: Path, threads: int = 0, options: dict | None = None) -> Any:
        """Load the artifact; ``threads`` = 0 lets the runtime choose; ``options``: the target's."""

    def run(self, handle: Any, x: np.ndarray) -> np.ndarray:
        """Return the first output (logits) for the input batch ``x``."""

    def timed_call(self, handle: Any, x: np.ndarray):
        """A zero-argument callable doing exactly one inference on ``x``, for the timing loop."""

    def input_info(self, handle: Any) -> dict:
        """``{"name": str, "shape": list, "fixed_batch": int | None}`` of the first input."""

    def describe_environment(self, handle: Any = None) -> dict:
        """Runtime version, threads, execution providers; merged with ``host_facts()``."""


def release(runner: Runner, handle: Any) -> None:
    """Free what a runner holds for ``handle`` (device memory, streams), where it holds any."""
    if hasattr(runner, "unload"):
        runner.unload(handle)


def padded_chunks(x: np.ndarray, size: int, min_size: int = 1):
    """(chunk, n) for runtimes that take fixed or bounded batches: ``x`` in chunks of at most
    ``size``; a chunk below ``min_size`` is padded by repeating its samples, of which the first
    ``n`` are real (the caller drops the padding's outputs)."""
    for i in range(0, len(x), size):
        chunk = x[i:i + size]
        n = len(chunk)
        if n < min_size:
            chunk = np.resize(chunk, (min_size,) + chunk.shape[1:])
        yield chunk, n


@dataclass
class Compiled:
    """What a backend's export-time compile step produced: the artifact bench will run, and
    reports for the manifest (e.g. ``fusion``)."""

    artifact: Path
    reports: dict = field(default_factory=dict)


@dataclass
class ExportContext:
    """What the deploy stage hands a backend when it builds a bundle in ``bundle`` (a staging
    folder whose final name is ``name``): the target, the PyTorch reference logits on the eval
    samples, the device profiles that list this target, and a log."""

    bundle: Path
    name: str
    target: Any  # catalog.Target
    reference: np.ndarray
    profiles: list = field(default_factory=list)  # catalog.Profile objects listing the target
    log: Log = lambda s: None  # noqa: E731


class Backend:
    """The interface every backend implements (defaults: a plain ONNX runtime, nothing extra)."""

    name: str = ""
    title: str = ""  # how people write its name ("ONNX Runtime")
    builds_on_device: bool = False  # its artifact is built where it runs (``compile_on_device``)
    device_files: tuple[str, ...] = ()  # the fixed file names ``compile_on_device`` writes into the bundle
    flavours: tuple[str, ...] = ()  # export flavours it takes (edgekd.export), preferred first
    options: dict[str, Option] = {}
    package: str = ""  # the pip package its runtime needs
    extra: str = ""  # the edgekd extra that installs it
    purpose: str = ""  # completes "... needs the 'package' package"
    estimated: bool = False  # bench reports an estimate from the manifest instead of timing
    float_ok: bool = False  # runs a float (fp32) model too: ``export --float``, the reference bundle
    opset_min: int = 13

    def runner(self) -> Runner:
        """The runtime's Runner (imports the runtime package; missing: MissingExtraError)."""
        raise NotImplementedError

    def check_run(self, quant: dict, target) -> str | None:
        """Why a run quantized with ``quant`` (QuantSpec dict) cannot be exported for ``target``."""
        return None

    def compile(self, onnx_path: Path, ctx: ExportContext) -> Compiled:
        """The compile step at export, next to ``onnx_path`` in the bundle folder."""
        return Compiled(onnx_path)

    def infer(self, artifact: Path, x: np.ndarray, options: dict | None = None) -> np.ndarray:
        """Logits of ``artifact`` on ``x`` for export's parity check (default: its runner)."""
        from ..bundle import batched_logits

        runner = self.runner()
        handle = runner.load(artifact, 0, options)
        try:
            fixed = runner.input_info(handle)["fixed_batch"]
            return batched_logits(runner, handle, x, fixed or 256, fixed is not None)
        finally:
            release(runner, handle)

    def manifest_extras(self, ctx: ExportContext) -> dict:
        """Manifest fields particular to this backend."""
        return {}

    def estimate(self, manifest: dict, profile: str | None) -> dict | None:
        """For ``estimated`` backends: the speed estimate bench reports for ``profile``."""
        return None

    def compile_on_device(self, bundle: Path, manifest: dict, profile, log: Log) -> dict:
        """Build on the device what cannot be built elsewhere (``builds_on_device``); returns the
        manifest fields to update, with the artifact's parity report under ``parity``."""
        raise NotImplementedError

    def run_tapped(self, model_path: Path, model, tapped: dict, x: np.ndarray) -> dict[str, np.ndarray] | None:
        """Run the exported graph ``model_path`` (``model``: that file loaded as an onnx ModelProto) on
        ``x`` and return, by name, the real value of every tap in ``tapped`` (``export.probe.Tap``) as
        this runtime computes it: ``edgekd explain``'s runtime columns. None (the default): this
        backend cannot."""
        return None

    def import_error(self, e: ImportError) -> EdgekdError | None:
        """A MissingExtraError when ``e`` is this backend's runtime package missing."""
        if e.name and e.name.split(".")[0] == self.package:
            return MissingExtraError(self.package, self.extra, self.purpose)
        return None


_BUILTIN = {"onnxruntime": "edgekd.backends.onnxruntime", "tensorrt": "edgekd.backends.tensorrt",
            "qonnx": "edgekd.backends.qonnx"}
_REGISTERED: dict[str, Backend | str] = dict(_BUILTIN)


def register_backend(backend: Backend | str, name: str | None = None) -> None:
    """Register a Backend instance, or (lazily) the path of a module exposing ``BACKEND``."""
    key = name or getattr(backend, "name", None)
    if not key:
        raise ValueError("a backend needs a name")
    _REGISTERED[key] = backend


def unregister_backend(name: str) -> None:
    _REGISTERED.pop(name, None)


def backend_names() -> list[str]:
    return list(_REGISTERED)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; unknown names fail with a did-you-mean. Importing a built-in
    backend's module never imports its runtime package."""
    entry = _REGISTERED.get(name) if isinstance(name, str) else None
    if entry is None:
        raise unknown("backend", str(name), list(_REGISTERED))
    if isinstance(entry, str):
        entry = importlib.import_module(entry).BACKEND
        _REGISTERED[name] = entry
    return entry


def implementing(method: str) -> list[Backend]:
    """The registered backends that override ``Backend.method`` (a backend whose module fails to
    import is left out)."""
    found = []
    for name in backend_names():
        try:
            backend = get_backend(name)
        except (ImportError, AttributeError, EdgekdError):
            continue
        impl = getattr(type(backend), method, None)
        if impl is not None and impl is not getattr(Backend, method):
            found.append(backend)
    return found


def get_runner(name: str) -> Runner:
    """The runner of backend ``name``, its runtime imported now (missing: one-line install hint)."""
    backend = get_backend(name)
    try:
        return backend.runner()
    except ImportError as e:
        error = backend.import_error(e)
        if error is None:
            raise
        raise error from None
