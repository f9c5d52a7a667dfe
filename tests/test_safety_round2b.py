"""Safety round 2b (issue #21, a second hostile pass): variants of the round-2 cases.

- A staging-like name with a PID no process can have is neither a crash nor removed.
- ``--out ~`` (the home folder, its parents, a folder at the top of the file system) is never
  replaced, not even with --overwrite.
- JSON nested too deeply (manifest, metrics, sweep.json, recipe) is one line, never a RecursionError.
- A bundle's manifest ``files`` makes a file edgekd's only when it is a plain name, a regular file and
  holds the recorded sha256: a crafted manifest listing a user's file or folder never gets it deleted;
  a run's fixed file names count only as regular files.
- ``edgekd compile`` never lists a user's file in the manifest, never replaces a file it did not write,
  and never writes a timing cache outside the bundle.
- Unbounded sizes: --image-size and --workers are refused before anything is decoded or forked; running
  out of memory while decoding is said as such, never skipped as a bad image.
- Image modes decode the same cached and uncached: EXIF orientation applied, alpha dropped, LA grey,
  animated images by their first frame, 32-bit float / beyond-16-bit integer images unreadable; GIF and
  TIFF files are read, not silently left out.
- Export refuses image folders whose images changed size since the run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgekd.core import fsutil, staging
from edgekd.core.errors import ConfigError, EdgekdError
from tests.test_bad_input import assert_user_error, run
from tests.test_safety_fs import TINY_DISTILL, dead_owner, make_images
from tests.test_safety_paths import FAST_BENCH, TINY, forbid_training, snapshot

F_NOT_OURS = "which edgekd did not write"
F_DEEP = "nested more than 64 levels"




def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# --- staging names ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("pid", ["9999999999", "4194305"], ids=["beyond-c-int", "beyond-linux"])
def test_a_staging_name_with_an_impossible_pid_is_kept_and_no_crash(pid, tmp_path):
    name = f".x.edgekd-{staging._host()}-{pid}-0-abcdefgh.tmp"
    (tmp_path / name).write_text("mine\n")
    fsutil.write_json(tmp_path / "rows.json", [])  # cleans stale staging next to it first
    assert (tmp_path / name).read_text() == "mine\n"
    dead = f".y.edgekd-{dead_owner()}-abcdefgh.tmp"  # a dead writer's is still removed
    (tmp_path / dead).write_text("")
    fsutil.write_json(tmp_path / "rows.json", [])
    assert not (tmp_path / dead).exists() and (tmp_path / name).exists()


@pytest.mark.parametrize("owner", ["abcdef-123-0", "live"], ids=["other-host", "live-pid"])
def test_a_staging_name_inside_a_bundle_that_is_not_a_dead_writers_is_kept(owner, trained, tmp_path, monkeypatch):
    shutil.copytree(trained.run, tmp_path / "run")
    shutil.copytree(trained.bundle, tmp_path / "b")
    owner = staging._owner() if owner == "live" else owner
    name = f".notes.edgekd-{owner}-abcdefgh.tmp"
    (tmp_path / "b" / name).write_text("mine\n")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert_user_error(run("export", "run", "--out", "b", "-q"), f"b holds {name}", F_NOT_OURS)
    assert snapshot(tmp_path) == before
    (tmp_path / "b" / name).unlink()
    dead = f".manifest.json.edgekd-{dead_owner()}-abcdefgh.tmp"  # a killed writer's: replaced with the bundle
    (tmp_path / "b" / dead).write_text("")
    assert run("export", "run", "--out", "b", "-q").exit_code == 0
    assert not (tmp_path / "b" / dead).exists()


def test_bench_next_to_an_impossible_staging_name_is_not_a_traceback(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = f".r.json.edgekd-{staging._host()}-9999999999-0-abcdefgh.tmp"
    (tmp_path / name).write_text("mine\n")
    result = run("bench", trained.bundle, "--json", "r.json", *FAST_BENCH)
    assert result.exit_code == 0, result.output
    assert (tmp_path / name).read_text() == "mine\n"


# --- the home folder and the top of the file system -----------------------------------------------------

def test_the_home_folder_is_never_replaced_even_with_overwrite(trained, tmp_path, monkeypatch):
    home, work = tmp_path / "users" / "me", tmp_path / "work"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "thesis.txt").write_text("years of work\n")
    work.mkdir()
    shutil.copytree(trained.run, work / "run")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    for out in (str(home), str(home.parent)):  # the home folder, one of its parents
        assert_user_error(run("export", "run", "--out", out, "--overwrite", "-q"), out,
                          "is the home folder or one of its parents")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("folder", ["/usr", "/etc"])
def test_a_folder_at_the_top_of_the_file_system_is_never_replaced(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EdgekdError, match="top of the file system"):
        fsutil.check_output(folder, "bundle", overwrite=True)
    assert fsutil.check_output(tmp_path / "new", "bundle") == tmp_path / "new"  # a new folder still is fine


# --- JSON nested too deeply ------------------------------------------------------------------------------

def test_json_nesting_is_bounded():
    from edgekd.core import jsonfile

    assert jsonfile.loads(deep(64)) == json.loads(deep(64))
    for text in (deep(65), deep(200_000), '{"a":' * 100 + "1" + "}" * 100):
        with pytest.raises(ValueError, match=F_DEEP):
            jsonfile.loads(text)


@pytest.mark.parametrize("file", ["manifest.json", "metrics.json", "sweep.json"])
def test_an_output_folder_with_deeply_nested_json_is_one_line(file, trained, tmp_path, monkeypatch):
    shutil.copytree(trained.run, tmp_path / "run")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / file).write_text(deep(200_000))
    monkeypatch.chdir(tmp_path)
    forbid_training(monkeypatch)
    before = snapshot(tmp_path)
    assert_user_error(run("export", "run", "--out", "out", "-q"), "out", "was not written by edgekd")
    assert_user_error(run(*TINY_DISTILL, "--out", "out"), "out", "was not written by edgekd")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("levels", [200_000, 100], ids=["recursion", "deep"])
def test_bench_of_a_deeply_nested_manifest_says_so(levels, trained, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(trained.bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    text = json.dumps(manifest | {"quant": "X"}).replace('"X"', deep(levels))
    (bundle / "manifest.json").write_text(text)
    result = run("bench", bundle, *FAST_BENCH)
    assert_user_error(result, "corrupt bundle", F_DEEP, code=0, prefix="b: error:")  # a row: exit 0 unless --strict


# --- what a bundle's manifest or a run's names make edgekd's ------------------------------------------------

def _craft(bundle: Path, **listed) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"] |= listed
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_a_crafted_manifest_never_gets_a_user_file_or_folder_deleted(trained, tmp_path, monkeypatch):
    shutil.copytree(trained.run, tmp_path / "run")
    bundle = tmp_path / "b"
    shutil.copytree(trained.bundle, bundle)
    (bundle / "notes.txt").write_text("mine\n")
    (bundle / "sub").mkdir()
    (bundle / "sub" / "data.txt").write_text("mine\n")
    (tmp_path / "outside").write_text("mine\n")
    _craft(bundle, **{"notes.txt": "0" * 64, "sub": "0" * 64, "../outside": "0" * 64, "/etc/passwd": "0" * 64})
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert_user_error(run("export", "run", "--out", "b", "-q"), "b holds notes.txt", F_NOT_OURS)
    (bundle / "notes.txt").unlink()
    before = snapshot(tmp_path)
    assert_user_error(run("export", "run", "--out", "b", "-q"), "b holds sub", F_NOT_OURS)
    assert snapshot(tmp_path) == before


def test_a_listed_file_changed_since_export_is_not_edgekds(trained, tmp_path, monkeypatch):
    shutil.copytree(trained.run, tmp_path / "run")
    shutil.copytree(trained.bundle, tmp_path / "b")
    with open(tmp_path / "b" / "model.onnx", "ab") as f:
        f.write(b"my edit")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert_user_error(run("export", "run", "--out", "b", "-q"), "b holds model.onnx", F_NOT_OURS)
    assert snapshot(tmp_path) == before


def test_a_folder_named_like_a_run_file_is_not_edgekds(trained, tmp_path, monkeypatch):
    shutil.copytree(trained.run, tmp_path / "run")
    (tmp_path / "run" / "curves.png").unlink()
    (tmp_path / "run" / "curves.png").mkdir()
    (tmp_path / "run" / "curves.png" / "mine.png").write_text("mine\n")
    monkeypatch.chdir(tmp_path)
    forbid_training(monkeypatch)
    before = snapshot(tmp_path)
    assert_user_error(run(*TINY_DISTILL, "--out", "run"), "run holds curves.png", F_NOT_OURS)
    assert snapshot(tmp_path) == before


# --- compile -----------------------------------------------------------------------------------------------

def _fake_build(monkeypatch):
    from edgekd.backends.tensorrt import TensorrtBackend

    def compile_on_device(self, bundle, manifest, profile, log):
        from edgekd.bundle import parity

        (bundle / "model.engine").write_bytes(b"engine")
        (bundle / "engine_layers.json").write_text("{}")
        (bundle / "timing-gpu-trt10-int8.cache").write_bytes(b"cache")
        reference = np.load(bundle / "reference_logits.npy")
        report = parity(reference, reference, np.zeros(len(reference), np.int64))
        engine = {"trt_version": "10.3", "device": "gpu", "layers": {"int8_layers": [], "layers": 1}}
        return {"model_file": "model.engine", "compiled": True, "engine_parity": report, "engine": engine,
                "runtime_accuracy": report["runtime_accuracy"]}

    monkeypatch.setattr(TensorrtBackend, "compile_on_device", compile_on_device)


def test_compile_never_lists_a_user_file_in_the_manifest(tmp_path, monkeypatch):
    from tests.test_backends import _fake_trt_bundle

    bundle = _fake_trt_bundle(tmp_path / "b")
    (bundle / "notes.txt").write_text("mine\n")
    _fake_build(monkeypatch)
    result = run("compile", bundle, "-q")
    assert result.exit_code == 0, result.output
    files = json.loads((bundle / "manifest.json").read_text())["files"]
    assert {"model.engine", "engine_layers.json", "timing-gpu-trt10-int8.cache", "model.onnx"} <= set(files)
    assert "notes.txt" not in files
    assert "notes.txt" not in fsutil.own_entries(bundle)
    with pytest.raises(EdgekdError, match="holds notes.txt"):  # so exporting over it keeps the user's file
        fsutil.check_output(bundle, "bundle")
    (bundle / "notes.txt").unlink()  # what compile wrote is edgekd's: a new export may replace it
    assert {"model.engine", "engine_layers.json", "timing-gpu-trt10-int8.cache"} <= fsutil.own_entries(bundle)
    assert fsutil.check_output(bundle, "bundle") == bundle


def test_compile_never_replaces_an_engine_it_did_not_write(tmp_path, monkeypatch):
    from tests.test_backends import _fake_trt_bundle

    bundle = _fake_trt_bundle(tmp_path / "b")
    (bundle / "model.engine").write_bytes(b"my own engine")
    _fake_build(monkeypatch)
    before = snapshot(tmp_path)
    assert_user_error(run("compile", bundle, "-q"), "holds model.engine", F_NOT_OURS)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["../evil.cache", "/tmp/evil.cache", ".."])
def test_compile_never_writes_a_timing_cache_outside_the_bundle(name, tmp_path, monkeypatch):
    from edgekd.backends.tensorrt.plan import timing_cache_name
    from tests.test_backends import _fake_trt_bundle

    bundle = _fake_trt_bundle(tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["backend_options"]["timing_cache"] = name
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    _fake_build(monkeypatch)
    before = snapshot(tmp_path)
    assert_user_error(run("compile", bundle, "-q"), "options.timing_cache must be a file name")
    assert snapshot(tmp_path) == before
    with pytest.raises(EdgekdError, match="not a file name"):
        timing_cache_name("gpu", "10.3", "int8", name)


@pytest.mark.parametrize("option, fragment", [('timing_cache = "../../x.cache"', "timing_cache must be a file name"),
                                               ("workspace_mb = 99999999999999999999", "workspace_mb must be in")])
def test_a_target_whose_tensorrt_options_leave_their_bounds_is_refused(option, fragment, tmp_path):
    from edgekd import catalog

    toml = tmp_path / "mytrt.toml"
    toml.write_text('backend = "tensorrt"\nflavour = "qdq"\n[quant]\nact_after_relu = "signed"\nbias = "float"\n'
                    f'[options]\n{option}\n')
    with pytest.raises(ConfigError, match=fragment):
        catalog.load_target(str(toml))


def test_a_reference_file_outside_the_bundle_is_a_corrupt_manifest(tmp_path):
    from edgekd.bundle import BundleError, read_manifest
    from tests.test_backends import _fake_trt_bundle

    bundle = _fake_trt_bundle(tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps(manifest | {"reference_file": "/etc/passwd"}))
    with pytest.raises(BundleError, match="reference_file '/etc/passwd' is not a file name inside the bundle"):
        read_manifest(bundle)


# --- unbounded sizes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, fragments", [
    (["--image-size", "1000000"], ["--image-size 1000000 is larger than 4096"]),
    (["--workers", "100000"], ["--workers 100000 is more than", "CPUs here"]),
], ids=["image-size", "workers"])
@pytest.mark.parametrize("command", ["distill", "train"])
def test_sizes_that_would_exhaust_the_machine_are_refused_first(command, argv, fragments, tmp_path, monkeypatch):
    make_images(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    forbid_training(monkeypatch)
    before = snapshot(tmp_path)
    base = TINY_DISTILL if command == "distill" else ["train", "--epochs", "1", "-q"]
    assert_user_error(run(*base, "--data", "imagefolder:imgs", "--out", "o", *argv), *fragments)
    assert snapshot(tmp_path) == before


def test_running_out_of_memory_while_decoding_is_not_a_bad_image(tmp_path, monkeypatch):
    from edgekd.data import load_dataset
    from edgekd.data.imagefolder import Transform
    from edgekd.data.options import DataOptions

    make_images(tmp_path / "imgs")
    data = load_dataset(f"imagefolder:{tmp_path / 'imgs'}",
                        options=DataOptions(image_cache="off", workers=0, skip_bad_images=True))

    def no_memory(self, path, rng=None):
        raise MemoryError()

    monkeypatch.setattr(Transform, "decode", no_memory)
    with pytest.raises(ConfigError, match="out of memory decoding image"):
        data.test.load(0)
    assert not data.test.bad


# --- image modes -------------------------------------------------------------------------------------------

def _odd_images(root: Path) -> dict:
    """Two classes of images in odd modes (8 wide, 6 high as shown); the expected first-class pixels."""
    from PIL import Image

    rng = np.random.default_rng(0)
    shown = {}
    for split in ("train", "test"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for kind in ("cmyk", "palette-transparent", "la", "1bit", "gif", "exif", "rgba", "rgb"):
                rgb = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
                im = Image.fromarray(rgb)
                if kind == "cmyk":
                    im.convert("CMYK").save(folder / f"{kind}.jpg")
                elif kind == "palette-transparent":
                    im.convert("P").save(folder / f"{kind}.png", transparency=0)
                elif kind == "la":
                    im.convert("LA").save(folder / f"{kind}.png")
                elif kind == "1bit":
                    im.convert("1").save(folder / f"{kind}.png")
                elif kind == "gif":
                    frames = [im.convert("P")] + [Image.fromarray(255 - rgb).convert("P")]
                    frames[0].save(folder / f"{kind}.gif", save_all=True, append_images=frames[1:])
                    shown[(split, label, kind)] = np.asarray(frames[0].convert("RGB"))
                elif kind == "exif":  # stored 6 wide and 8 high, turned 90 degrees by its orientation (6)
                    stored = Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1)))
                    exif = stored.getexif()
                    exif[0x0112] = 6
                    stored.save(folder / f"{kind}.png", exif=exif.tobytes())
                    shown[(split, label, kind)] = rgb
                else:
                    (im.convert("RGBA") if kind == "rgba" else im).save(folder / f"{kind}.png")
                    shown[(split, label, kind)] = rgb
    return shown


def test_odd_image_modes_decode_the_same_cached_and_uncached(tmp_path, monkeypatch):
    from edgekd.data import load_dataset
    from edgekd.data.options import DataOptions

    shown = _odd_images(tmp_path / "imgs")
    monkeypatch.setenv("EDGEKD_CACHE_DIR", str(tmp_path / "cache"))
    spec = f"imagefolder:{tmp_path / 'imgs'}"
    taken = {}
    for cache in ("on", "off"):
        data = load_dataset(spec, options=DataOptions(image_cache=cache, workers=0, normalize="none"))
        assert data.test.prepare() == (cache == "on")
        assert data.input_shape == (3, 6, 8) or list(data.input_shape) == [3, 6, 8]  # the EXIF image as shown
        taken[cache] = data.test.take(np.arange(len(data.test)))
    assert np.array_equal(taken["on"], taken["off"])
    assert len(data.test) == 16  # the GIFs are read, not left out
    for i, path in enumerate(data.test.files):
        parts = Path(path).parts
        key = ("test", parts[-2], Path(path).stem)
        if key in shown:  # exact where the mode keeps RGB: EXIF turned, alpha dropped, the GIF's first frame
            pixels = np.rint(taken["off"][i] * 255).astype(np.uint8).transpose(1, 2, 0)
            assert np.array_equal(pixels, shown[key]), key


def test_grey_images_with_alpha_count_as_grey(tmp_path):
    from PIL import Image

    from edgekd.data.imagefolder import FolderOptions, probe

    files = []
    for i, mode in enumerate(("LA", "L", "1")):
        Image.new(mode, (4, 4)).save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    assert probe(files, FolderOptions()) == (1, (4, 4))


@pytest.mark.parametrize("kind, fragment", [("float", "32-bit floats"), ("int32", "beyond 16 bits")])
def test_images_without_an_agreed_8_bit_scale_are_unreadable(kind, fragment, tmp_path, monkeypatch):
    from PIL import Image

    make_images(tmp_path / "imgs")
    a = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    im = Image.fromarray(a) if kind == "float" else Image.fromarray((a * 3e6).astype(np.int32))
    im.save(tmp_path / "imgs" / "train" / "a" / "odd.tif")
    monkeypatch.chdir(tmp_path)
    result = run("train", "--data", "imagefolder:imgs", "--arch", "mlp-student", "--epochs", "1", "--out", "o",
                 "--workers", "0", "--image-cache", "on", "-q")
    assert_user_error(result, "cannot read image", "odd.tif", fragment, "--skip-bad-images")
    assert not os.path.exists(tmp_path / "o")


def test_export_refuses_images_that_changed_size_since_the_run(tmp_path, monkeypatch):
    from PIL import Image

    from edgekd import api

    make_images(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    api.distill(api.DistillOptions(**TINY | {"data": "imagefolder:imgs", "workers": 0, "image_cache": "off"}),
                out=tmp_path / "run")
    for path in (tmp_path / "imgs").rglob("*.png"):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path)
    before = snapshot(tmp_path)
    assert_user_error(run("export", "run", "--out", "b", "-q"), "are 3x16x16 now, the run was trained on 3x8x8")
    assert snapshot(tmp_path) == before
