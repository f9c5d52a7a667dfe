"""What a remote bench ships and asks for: bundles, the wheel, the profile, wheelhouse files, the
requirements to install there, the bench flags and the clock settings.

Everything is decided here, before any connection, and is the same for every host.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ...backends import get_backend
from ...bundle import read_manifest, verify_files
from ...core.errors import ConfigError, EdgekdError, MissingFileError
from ...core.fsutil import sha256_file
from .ssh import RemoteOptions
from .wheel import build_wheel, device_requirements

# bench setting overrides (as edgekd.bench.resolve_settings takes them) -> `edgekd bench` flags
BENCH_FLAGS = {"threads": "--threads", "iterations": "--iterations", "warmup": "--warmup",
               "warmup_s": "--warmup-time", "min_time_s": "--min-time", "batch_sizes": "--batch-size"}
# what --set-clocks applies without a profile (a profile's [clocks] table replaces it)
DEFAULT_CLOCKS = {"governor": "performance", "jetson_clocks": True, "nvpmodel": None}


@dataclass
class Item:
    """A file or bundle folder kept under the remote dir at ``path`` (posix, relative)."""

    path: str
    source: Path
    kind: str  # "bundle" (a folder, checked against its manifest) or "file"
    size: int
    key: str | None = None  # bundles: sha256 of manifest.json, first 16 hex digits
    sha256: str | None = None  # files: checked when set

    def wire(self) -> dict:
        return {"path": self.path, "kind": self.kind, "size": self.size, "key": self.key, "sha256": self.sha256}


@dataclass
class BundleRef:
    local: Path
    name: str
    manifest: dict | None = None
    item: Item | None = None
    error: str | None = None  # a bundle that cannot be shipped (bad manifest, modified files): its error row


@dataclass
class Plan:
    refs: list[BundleRef]
    wheel: Item
    items: list[Item]  # everything the device needs
    requirements: list[str]
    profile: str | None  # remote path (relative) of the profile file
    bench_args: list[str]
    clocks: dict | None
    backends: set[str]


def clock_settings(profile) -> dict:
    """The clock settings ``--set-clocks`` applies: the profile's ``[clocks]`` table (governor,
    jetson_clocks, nvpmodel), else DEFAULT_CLOCKS (CPU governor ``performance``; on a Jetson
    ``jetson_clocks``; nvpmodel left alone)."""
    clocks = dict(DEFAULT_CLOCKS)
    extra = getattr(profile, "clocks", None)
    if dataclasses.is_dataclass(extra):
        extra = dataclasses.asdict(extra)
    clocks.update({k: v for k, v in (extra or {}).items() if k in DEFAULT_CLOCKS})
    if clocks.get("governor") == "keep":
        clocks["governor"] = None
    return clocks


def bundle_files(folder: Path) -> list[Path]:
    """The bundle's files to ship (dot-files left out). A symbolic link inside is refused: its
    target's contents would be shipped, and arrive with another file's mode."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):  # links to folders are listed, not entered
        base = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in dirnames + sorted(n for n in filenames if not n.startswith(".")):
            if (base / name).is_symlink():
                raise ConfigError(f"bundle {folder} holds a symbolic link: {base / name} -> "
                                  f"{os.readlink(base / name)}",
                                  "bench --host ships regular files only: replace the link by a copy of its target")
            if name in filenames and (base / name).is_file():
                found.append(base / name)
    return sorted(found)


def _bundle_ref(path: Path) -> BundleRef:
    path = Path(path)
    bundle_files(path)  # no links inside (an EdgekdError for the whole run: nothing is sent)
    try:
        manifest = read_manifest(path)
        verify_files(path, manifest)  # a bundle modified after export fails here, as bench says it would
    except EdgekdError as e:
        return BundleRef(path, path.name, error=e.one_line())
    key = sha256_file(path / "manifest.json")[:16]
    size = sum(p.stat().st_size for p in bundle_files(path))
    item = Item(f"bundles/{key}/{path.resolve().name}", path, "bundle", size, key=key)
    return BundleRef(path, str(manifest.get("name") or path.name), manifest, item)


def _file_item(prefix: str, path: Path, checksum: bool = True) -> Item:
    return Item(f"{prefix}/{path.name}", path, "file", path.stat().st_size,
                sha256=sha256_file(path) if checksum else None)


def _profile_items(profile) -> tuple[list[Item], str]:
    """The profile file (and target files it names by path, which must sit in its folder or
    below) under ``profiles/<hash>/``; returns the items and the profile's remote path."""
    source = Path(profile.path)
    if not source.is_file():
        raise MissingFileError(f"profile file not found: {source}")
    files = [(f"{profile.name}.toml", source)]
    for target in profile.targets:
        if os.path.isabs(target):  # a target given as a path; the catalog made it absolute
            rel = os.path.relpath(target, source.parent)
            if rel.startswith(".."):
                raise ConfigError(f"profile {source} names target file {target} outside its folder",
                                  "bench --host ships the profile and target files in its folder or below; "
                                  "move the target file next to the profile")
            files.append((Path(rel).as_posix(), Path(target)))
    digest = hashlib.sha256()
    for rel, path in files:
        digest.update(rel.encode() + b"\0" + sha256_file(path).encode())
    key = digest.hexdigest()[:16]
    items = [Item(f"profiles/{key}/{rel}", path, "file", path.stat().st_size, sha256=sha256_file(path))
             for rel, path in files]
    return items, items[0].path


def bench_args(overrides: dict) -> list[str]:
    """``edgekd bench`` flags for the settings given on the command line here."""
    args = []
    for name, value in overrides.items():
        if value is None or value == ():
            continue
        if name not in BENCH_FLAGS:
            raise ConfigError(f"unknown bench setting {name!r}", f"known: {', '.join(BENCH_FLAGS)}")
        values = value if name == "batch_sizes" else (value,)
        for v in values:
            args += [BENCH_FLAGS[name], str(v)]
    return args


def extras(backends: set[str]) -> list[str]:
    """The edgekd extras the device installs: ``device`` and those of the bundles' backends."""
    found = ["device"]
    for name in sorted(backends):
        try:
            extra = get_backend(name).extra
        except EdgekdError:
            continue  # an unknown backend: bench on the device reports it in the bundle's row
        if extra and extra not in found:
            found.append(extra)
    return found


def _wheelhouse_items(folder: Path) -> list[Item]:
    found = sorted(p for p in Path(folder).glob("*") if p.is_file() and p.name.endswith((".whl", ".tar.gz", ".zip")))
    if not found:
        raise MissingFileError(f"no wheels in {folder}", "fill it with pip download (see the README: Bench on the device)")
    return [_file_item("wheelhouse", p, checksum=False) for p in found]


def make_plan(bundles: Sequence[Path], profile, options: RemoteOptions, cache: Path | None) -> Plan:
    refs, seen = [], set()
    for ref in (_bundle_ref(Path(b)) for b in bundles):
        key = ref.item.path if ref.item is not None else str(ref.local)
        if key not in seen:  # the same bundle twice is benched once
            seen.add(key)
            refs.append(ref)
    backends = {str(r.manifest.get("backend")) for r in refs if r.manifest}
    wheel_path = build_wheel(cache)
    wheel = Item(f"wheels/{wheel_path.parent.name}/{wheel_path.name}", wheel_path, "file",
                 wheel_path.stat().st_size, sha256=sha256_file(wheel_path))
    items = [r.item for r in refs if r.item is not None] + [wheel]
    remote_profile = None
    if profile is not None:
        profile_items, remote_profile = _profile_items(profile)
        items += profile_items
    if options.wheelhouse is not None:
        items += _wheelhouse_items(options.wheelhouse)
    return Plan(refs, wheel, items, device_requirements(extras(backends)), remote_profile,
                bench_args(options.overrides), clock_settings(profile) if options.set_clocks else None, backends)


def _add_file(tar: tarfile.TarFile, path: Path, arcname: str, follow: bool) -> None:
    """One regular file, with its own permission bits (the device never widens them), no owner names."""
    try:
        fd = os.open(path, os.O_RDONLY | (0 if follow else os.O_NOFOLLOW))
    except OSError as e:
        raise MissingFileError(f"cannot read {path} to upload it: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path} is not a regular file", "bench --host ships regular files only")
        info = tarfile.TarInfo(arcname)
        info.size, info.mode, info.mtime = st.st_size, stat.S_IMODE(st.st_mode), int(st.st_mtime)
        tar.addfile(info, f)


def write_upload(stream, items: Sequence[Item]) -> None:
    """One tar stream of ``items`` (bundle folders file by file), names relative to the remote dir.
    Bundle files are never read through a link; the wheel, profile and wheelhouse files, named
    here by the user or edgekd, may be links."""
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for item in items:
            if item.kind == "bundle":
                for path in bundle_files(item.source):
                    _add_file(tar, path, f"{item.path}/{path.relative_to(item.source).as_posix()}", follow=False)
            else:
                _add_file(tar, item.source, item.path, follow=True)
