"""The edgekd wheel shipped to the device, built from the package this process imported.

What runs here runs there: the wheel holds the imported package's files (and the catalog), with
the installed distribution's metadata, so that ``pip install`` on the device pulls the same
requirements. No build backend and no network: a zip written here, cached by content.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Iterable

import edgekd

from ...catalog import data_dir
from ...core.fsutil import write_bytes

KEEP_WHEELS = 5  # local wheel cache: the most recently built ones
WHEEL_DATA = ("targets", "profiles")  # catalog folders the wheel carries as edgekd/_data/<kind>
# used only where the installed distribution's metadata cannot be read (a bare source tree)
FALLBACK_DEVICE_REQUIREMENTS = ("numpy>=1.24", "click>=8.1,<9", "onnxruntime>=1.18,<2",
                                "tomli>=2.0; python_version < '3.11'")


def local_cache_dir() -> Path:
    """$XDG_CACHE_HOME/edgekd, else ~/.cache/edgekd."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgekd"


def _package_files() -> list[tuple[str, Path]]:
    """(name in the wheel, file) of the imported edgekd package: every file of its folder but
    caches and hidden files, plus the catalog folders where the folder lacks ``_data`` (an
    editable install of a checkout keeps them at the repository root)."""
    package = Path(edgekd.__file__).resolve().parent
    files = []
    for path in sorted(package.rglob("*")):
        rel = path.relative_to(package)
        if (not path.is_file() or "__pycache__" in rel.parts or path.suffix in (".pyc", ".pyo")
                or any(part.startswith(".") for part in rel.parts)):
            continue
        files.append((f"edgekd/{rel.as_posix()}", path))
    for kind in WHEEL_DATA:
        if any(name.startswith(f"edgekd/_data/{kind}/") for name, _ in files):
            continue
        for path in sorted(data_dir(kind).glob("*")):
            if path.is_file() and not path.name.startswith("."):
                files.append((f"edgekd/_data/{kind}/{path.name}", path))
    return files


def _distribution():
    try:
        return importlib.metadata.distribution("edgekd")
    except importlib.metadata.PackageNotFoundError:
        return None


def _with_extra(requirement: str, extra: str) -> str:
    spec, _, marker = requirement.partition(";")
    marker = marker.strip()
    return f"{spec.strip()}; ({marker}) and extra == '{extra}'" if marker else f"{spec.strip()}; extra == '{extra}'"


def _metadata(version: str) -> tuple[str, str]:
    """METADATA and entry_points.txt for the wheel, from the installed distribution's metadata."""
    dist = _distribution()
    md = dist.metadata if dist is not None else None
    lines = ["Metadata-Version: 2.1", "Name: edgekd", f"Version: {version}"]
    for key in ("Summary", "License", "Requires-Python"):
        if md is not None and md.get(key):
            lines.append(f"{key}: {md[key]}")
    if dist is not None:
        lines += [f"Provides-Extra: {e}" for e in (md.get_all("Provides-Extra") or [])]
        lines += [f"Requires-Dist: {r}" for r in (dist.requires or [])]
    else:
        lines.append("Provides-Extra: device")
        lines += [f"Requires-Dist: {_with_extra(r, 'device')}" for r in FALLBACK_DEVICE_REQUIREMENTS]
    entry_points = (dist.read_text("entry_points.txt") if dist is not None else None) or \
        "[console_scripts]\nedgekd = edgekd.cli:main\n"
    return "\n".join(lines) + "\n", entry_points


def _zip(entries: list[tuple[str, bytes]]) -> bytes:
    """A deterministic zip: fixed timestamps and modes, in the given order."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return buffer.getvalue()


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(cache: Path | None = None) -> Path:
    """A py3-none-any wheel of the edgekd package this process imported (what runs here runs
    there), cached under ``<cache>/wheels/<version>-<source hash>/``. Built from the installed
    files and the distribution's metadata: no build backend, no network. Pure Python only."""
    version = edgekd.__version__
    cache = Path(cache) if cache is not None else local_cache_dir()
    metadata, entry_points = _metadata(version)
    info = f"edgekd-{version.replace('-', '_')}.dist-info"
    entries = [(name, path.read_bytes()) for name, path in _package_files()]
    entries += [(f"{info}/METADATA", metadata.encode()), (f"{info}/entry_points.txt", entry_points.encode()),
                (f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: edgekd.bench.remote\nRoot-Is-Purelib: true\n"
                                  b"Tag: py3-none-any\n")]
    source = hashlib.sha256()
    for name, data in entries:
        source.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    folder = cache / "wheels" / f"{version}-{source.hexdigest()[:16]}"
    wheel = folder / f"edgekd-{version.replace('-', '_')}-py3-none-any.whl"
    if wheel.is_file():
        return wheel
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries) + f"{info}/RECORD,,\n"
    write_bytes(wheel, _zip(entries + [(f"{info}/RECORD", record.encode())]))
    older = sorted((d for d in folder.parent.iterdir() if d.is_dir() and d != folder),
                   key=lambda d: d.stat().st_mtime, reverse=True)
    for stale in older[KEEP_WHEELS - 1:]:
        shutil.rmtree(stale, ignore_errors=True)
    return wheel


def device_requirements(extras: Iterable[str]) -> list[str]:
    """The installed distribution's requirements of ``extras`` (``pip install 'edgekd[device]'``
    semantics), their other markers kept for pip on the device to evaluate."""
    extras = set(extras)
    dist = _distribution()
    if dist is None:
        return list(FALLBACK_DEVICE_REQUIREMENTS) if "device" in extras else []
    clause = r"""extra\s*==\s*['"]([^'"]+)['"]"""
    found = []
    for requirement in dist.requires or []:
        spec, _, marker = requirement.partition(";")
        match = re.search(clause, marker)
        if not match or match.group(1) not in extras:
            continue
        rest = re.sub(r"\s*\band\s+" + clause + "|" + clause + r"\s*(\band\b)?", "", marker).strip()
        line = f"{spec.strip()}; {rest}" if rest else spec.strip()
        if line not in found:
            found.append(line)
    return found
