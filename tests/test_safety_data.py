"""Safety of data loading (issue #21, round 2): 16-bit images, a damaged decoded-image cache, a link
planted at the cache's lock, labels out of range, damaged IDX files and headers declaring huge shapes.
Each bad input is one ``error:`` line (exit 2, no traceback), found before anything large is
allocated and before training; nothing outside edgekd's own files is written, truncated or unpickled.

No case may train: ``edgekd.training.loop.fit`` is replaced by a function that fails the test.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from edgekd.core.errors import ConfigError, EdgekdError
from edgekd.core.locks import check_unlocked, write_lock
from edgekd.data import decoded, load_dataset
from edgekd.data.builtin import Dataset, Split
from edgekd.data.options import DataOptions
from tests.own_models import write_tree
from tests.test_bad_input import assert_user_error, run


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    import edgekd.training.loop

    def refuse(*args, **kwargs):
        raise AssertionError("a bad input reached training")

    monkeypatch.setattr(edgekd.training.loop, "fit", refuse)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "images"


def folder(path, **options):
    return load_dataset(f"imagefolder:{path}", seed=0, options=DataOptions(normalize="none", workers=0, **options))


def one_line(e) -> str:
    line = e.value.one_line()
    assert "\n" not in line and "Traceback" not in line
    return line


# --- 1. 16-bit PNGs ---------------------------------------------------------------------------------------------

def sixteen_bit_copy(src: Path, dst: Path) -> None:
    """Every PNG of ``src`` again under ``dst``, as a 16-bit grayscale PNG of the same picture (v * 257)."""
    from PIL import Image

    for path in src.rglob("*.png"):
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        a = np.asarray(Image.open(path)).astype(np.uint16) * 257
        im = Image.fromarray(a)
        assert im.mode == "I;16"
        im.save(out)


@pytest.mark.parametrize("options", [dict(image_cache="off"), dict(), dict(image_size=8, channels=3)])
def test_a_16_bit_png_gives_the_picture_of_its_8_bit_version(tmp_path, cache_dir, options):
    from PIL import Image

    write_tree(tmp_path / "eight", size=10)
    sixteen_bit_copy(tmp_path / "eight", tmp_path / "sixteen")
    with Image.open(next((tmp_path / "sixteen").rglob("*.png"))) as im:
        assert im.mode.startswith("I")  # read back as 16-bit
    eight, sixteen = folder(tmp_path / "eight", **options), folder(tmp_path / "sixteen", **options)
    assert sixteen.input_shape == eight.input_shape
    idx = np.arange(len(eight.test))
    np.testing.assert_array_equal(sixteen.test.take(idx), eight.test.take(idx))
    np.testing.assert_array_equal(sixteen.train.load(1), eight.train.load(1))
    assert 0.2 < float(sixteen.test.take(idx).mean()) < 0.8  # not clipped to white


def test_16_bit_values_are_scaled_not_clipped():
    from PIL import Image

    from edgekd.data.imagefolder import Transform

    ramp = np.linspace(0, 65535, 64).astype(np.int64).reshape(8, 8)
    want = np.round(ramp / 257).astype(np.uint8)[None]
    t = Transform((8, 8), 1, [0.0], [1.0])
    for im in (Image.fromarray(ramp.astype(np.uint16)), Image.fromarray(ramp.astype(np.int32))):  # I;16, I
        np.testing.assert_array_equal(t.pixels(im), want)
    rgb = Transform((8, 8), 3, [0.0] * 3, [1.0] * 3).pixels(Image.fromarray(ramp.astype(np.uint16)))
    np.testing.assert_array_equal(rgb, np.repeat(want, 3, axis=0))
    with Image.open(io.BytesIO(png_16_bit_rgb(np.stack([ramp] * 3, -1)))) as im:  # 48-bit colour PNG
        np.testing.assert_array_equal(Transform((8, 8), 3, [0.0] * 3, [1.0] * 3).pixels(im),
                                      np.repeat(np.floor(ramp / 256).astype(np.uint8)[None], 3, axis=0))


def png_16_bit_rgb(a: np.ndarray) -> bytes:
    """A PNG of 16 bits per channel (H, W, 3), written by hand (PIL cannot write one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in a)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


# --- 2. a damaged decoded-image cache ---------------------------------------------------------------------------

def zero(data: Path, meta: Path) -> None:
    data.write_bytes(bytes(data.stat().st_size))


def flip_one_byte(data: Path, meta: Path) -> None:
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))


def truncate(data: Path, meta: Path) -> None:
    data.write_bytes(data.read_bytes()[:-7])


def bad_rows_out_of_range(data: Path, meta: Path) -> None:
    meta.write_text(meta.read_text().replace('"bad_rows": []', '"bad_rows": [99999]'))


def record_garbage(data: Path, meta: Path) -> None:
    meta.write_text("{not json")


@pytest.mark.parametrize("damage", [zero, flip_one_byte, truncate, bad_rows_out_of_range, record_garbage])
def test_a_damaged_cache_is_rebuilt_not_trusted(tmp_path, cache_dir, damage):
    write_tree(tmp_path / "t")
    first = folder(tmp_path / "t")
    assert first.test.prepare() and first.test.cache.rebuilt is None
    want = first.test.take(np.arange(len(first.test)))
    data = first.test.cache.path
    damage(data, data.with_suffix(".json"))
    again = folder(tmp_path / "t")
    assert again.test.prepare()
    assert again.test.cache.path == data and again.test.cache.rebuilt
    np.testing.assert_array_equal(again.test.take(np.arange(len(again.test))), want)
    assert "rebuilt:" in again.test.cache_line()
    assert folder(tmp_path / "t").test.prepare()  # the rebuilt cache is trusted: read, not decoded again
    assert decoded.open_cached(data.stem, again.test.cache.shape, cache_dir) is not None
    if damage is zero:
        assert "checksum" in again.test.cache.rebuilt


# --- 3. links planted at lock files and cache files -------------------------------------------------------------

def test_a_link_at_the_cache_lock_is_refused_and_its_target_never_truncated(tmp_path, cache_dir):
    write_tree(tmp_path / "t")
    data = folder(tmp_path / "t")
    key = decoded.cache_key(data.test.files, data.test.transform.geometry())
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    cache_dir.mkdir(parents=True)
    (cache_dir / f".{key}.lock").symlink_to(victim)
    with pytest.raises(EdgekdError) as e:
        data.test.prepare()
    assert "is a symbolic link" in one_line(e) and f".{key}.lock" in one_line(e)
    assert victim.read_text() == "precious\n"
    assert (cache_dir / f".{key}.lock").is_symlink()  # refused, not removed either
    assert not list(cache_dir.glob("*.u8"))


def test_a_hard_link_or_a_fifo_at_the_cache_lock_is_refused(tmp_path, cache_dir):
    write_tree(tmp_path / "t")
    data = folder(tmp_path / "t")
    key = decoded.cache_key(data.test.files, data.test.transform.geometry())
    cache_dir.mkdir(parents=True)
    victim = cache_dir / "victim.txt"
    victim.write_text("precious\n")
    os.link(victim, cache_dir / f".{key}.lock")
    with pytest.raises(EdgekdError) as e:
        data.test.prepare()
    assert "other hard links" in one_line(e) and victim.read_text() == "precious\n"
    os.unlink(cache_dir / f".{key}.lock")
    os.mkfifo(cache_dir / f".{key}.lock")
    with pytest.raises(EdgekdError) as e:
        folder(tmp_path / "t").test.prepare()
    assert "not a regular file" in one_line(e)


def test_a_link_at_a_cache_file_is_neither_followed_nor_replaced(tmp_path, cache_dir):
    write_tree(tmp_path / "t")
    data = folder(tmp_path / "t")
    key = decoded.cache_key(data.test.files, data.test.transform.geometry())
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"\0" * 10)
    cache_dir.mkdir(parents=True)
    (cache_dir / f"{key}.u8").symlink_to(victim)
    with pytest.raises(EdgekdError) as e:
        data.test.prepare()
    assert "symbolic link" in one_line(e) and "--image-cache off" in one_line(e)
    assert victim.read_bytes() == b"\0" * 10 and (cache_dir / f"{key}.u8").is_symlink()


def test_a_link_at_a_run_lock_is_refused_and_its_target_never_truncated(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / ".run.lock").symlink_to(victim)
    with pytest.raises(EdgekdError) as e:
        with write_lock(tmp_path / "run"):
            raise AssertionError("locked through a link")
    assert "is a symbolic link" in one_line(e) and victim.read_text() == "precious\n"
    os.unlink(tmp_path / ".run.lock")
    os.mkfifo(tmp_path / ".run.lock")
    check_unlocked(tmp_path / "run")  # returns at once: a FIFO is nobody's lock (and never blocks)


def test_a_link_at_a_run_lock_stops_distill_with_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / ".run.lock").symlink_to(victim)
    result = run("distill", "--out", "run", "--epochs", "1", "--float-epochs", "0", "-q")
    assert_user_error(result, ".run.lock", "is a symbolic link")
    assert victim.read_text() == "precious\n" and not (tmp_path / "run").exists()


# --- 4. labels out of range -------------------------------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray, packed: bool | None = None, header: bytes | None = None) -> Path:
    """An IDX file of ``array`` (unsigned bytes), gzipped when ``packed`` (default: when named *.gz)."""
    head = header if header is not None else (struct.pack(">HBB", 0, 0x08, array.ndim)
                                              + struct.pack(">" + "I" * array.ndim, *array.shape))
    raw = head + np.asarray(array, np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if (path.suffix == ".gz" if packed is None else packed) else raw)
    return path


def fashion_dir(root: Path, n_train: int = 60, n_test: int = 20, size: int = 6, packed: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if packed else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, size, size)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 10)
    return root


@pytest.mark.parametrize("prefix, label", [("t10k", 10), ("t10k", 255), ("train", 200)])
def test_an_idx_label_outside_the_classes_is_one_line(tmp_path, prefix, label):
    root = fashion_dir(tmp_path / "f")
    labels = np.arange(60 if prefix == "train" else 20) % 10
    labels[3] = label
    write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    with pytest.raises(ConfigError) as e:
        load_dataset(f"fashion-mnist:{root}")
    assert f"{prefix}-labels-idx1-ubyte.gz" in one_line(e) and f"label {label}" in one_line(e)
    assert "0..9" in one_line(e)


def test_an_out_of_range_label_stops_distill_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = fashion_dir(tmp_path / "f")
    write_idx(root / "train-labels-idx1-ubyte.gz", np.r_[np.arange(59) % 10, 200])
    result = run("distill", "--data", f"fashion-mnist:{root}", "--out", "run", "--epochs", "1", "-q")
    assert_user_error(result, "train-labels-idx1-ubyte.gz", "label 200", "0..9")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("y, fragments", [
    (np.r_[np.arange(39) % 4, 2**62], ["label 4611686018427387904", "0..99999"]),
    (np.array([*(np.arange(39) % 4), 2**63 + 5], np.uint64), ["label 9223372036854775813", "0..99999"]),
    (np.r_[np.arange(39) % 4, 1e30].astype(np.float64), ["label 1e+30", "0..99999"]),
    (np.r_[np.arange(39) % 4, -3], ["negative labels (e.g. -3)", "0..C-1"]),
    (np.r_[np.arange(39) % 4, -2.0**70], ["negative labels", "0..C-1"]),
])
def test_an_npz_label_outside_the_range_is_one_line(tmp_path, y, fragments):
    np.savez(tmp_path / "d.npz", x=np.zeros((40, 6, 6), np.float32), y=y)
    with pytest.raises(ConfigError) as e:
        load_dataset(f"npz:{tmp_path / 'd.npz'}")
    for fragment in ["d.npz", *fragments]:
        assert fragment in one_line(e)


def test_every_split_of_every_dataset_is_checked_against_its_classes():
    from edgekd.data.builtin import check_labels

    x = np.zeros((4, 1, 2, 2), np.float32)
    good = Split(x, np.array([0, 1, 2, 1]))
    for bad in (np.array([0, 1, 3, 1]), np.array([0, -1, 2, 1])):
        data = Dataset("npz:d.npz", good, good, Split(x, bad), ["a", "b", "c"], [0.0], [1.0])
        with pytest.raises(ConfigError) as e:
            check_labels(data)
        assert f"test split holds label {bad[bad.argmin() if bad.min() < 0 else bad.argmax()]}" in one_line(e)
        assert "0..2 (3 classes)" in one_line(e)


def test_export_refuses_python_api_data_with_other_classes(tmp_path):
    import torch

    from edgekd.api import TorchData
    from edgekd.pipeline.evalset import read_test_split

    ds = torch.utils.data.TensorDataset(torch.zeros(20, 1, 4, 4), torch.arange(20) % 4)
    meta = {"dataset": "python-api", "seed": 0, "classes": ["0", "1", "2"], "normalization": {}}
    with pytest.raises(EdgekdError) as e:
        read_test_split(meta, TorchData(ds, ds, classes=[0, 1, 2, 3]))
    assert "not the run's any more (4 now, 3 in the run)" in one_line(e)


# --- 5. damaged IDX files ---------------------------------------------------------------------------------------

def raw_named_gz(root: Path) -> None:
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10, packed=False)


def test_a_raw_idx_file_named_gz_is_read_by_its_content(tmp_path):
    root = fashion_dir(tmp_path / "f")
    want = load_dataset(f"fashion-mnist:{root}")
    for name in ("t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz"):
        path = root / name
        path.write_bytes(gzip.decompress(path.read_bytes()))
    got = load_dataset(f"fashion-mnist:{root}")
    np.testing.assert_array_equal(got.test.y, want.test.y)
    np.testing.assert_array_equal(got.train.x, want.train.x)
    raw = load_dataset(f"fashion-mnist:{fashion_dir(tmp_path / 'raw', packed=False)}")
    np.testing.assert_array_equal(raw.test.x, want.test.x)


def gz_of(raw: bytes) -> bytes:
    return gzip.compress(raw)


IMAGES_HEAD = struct.pack(">HBBIII", 0, 8, 3, 20, 6, 6)
IDX_CASES = [
    # (name, file to replace, its bytes, fragments)
    ("garbage", "t10k-images-idx3-ubyte.gz", b"this is not an IDX file at all", ["is not an IDX file"]),
    ("garbage-gzipped", "t10k-images-idx3-ubyte.gz", gz_of(b"PK\x03\x04 a zip, not IDX"), ["is not an IDX file"]),
    ("gzip-magic-then-garbage", "t10k-images-idx3-ubyte.gz", b"\x1f\x8b" + b"\x00" * 40, ["cannot be read as an IDX",
                                                                                         "damaged gzip"]),
    ("gzip-cut-short", "t10k-images-idx3-ubyte.gz", gz_of(IMAGES_HEAD + bytes(720))[:-30], ["damaged gzip"]),
    ("empty", "t10k-images-idx3-ubyte.gz", b"", ["is not an IDX file (only 0 bytes)"]),
    ("wrong-magic", "t10k-images-idx3-ubyte.gz", gz_of(b"\x08\x03\x00\x00" + bytes(800)), ["magic 08030000"]),
    ("wrong-type", "t10k-images-idx3-ubyte.gz", gz_of(struct.pack(">HBBIII", 0, 0x0D, 3, 20, 6, 6) + bytes(2880)),
     ["type 0x0d, expected 0x08"]),
    ("images-as-labels", "t10k-labels-idx1-ubyte.gz", gz_of(IMAGES_HEAD + bytes(720)),
     ["3-dimensional array, expected 1 dimensions"]),
    ("header-cut", "t10k-images-idx3-ubyte.gz", gz_of(IMAGES_HEAD[:9]), ["truncated", "3 dimensions"]),
    ("data-truncated-gz", "t10k-images-idx3-ubyte.gz", gz_of(IMAGES_HEAD + bytes(700)), ["truncated (700 of 720"]),
    ("data-truncated-raw", "t10k-images-idx3-ubyte", IMAGES_HEAD + bytes(700), ["truncated", "holds 700"]),
    ("trailing-data", "t10k-images-idx3-ubyte.gz", gz_of(IMAGES_HEAD + bytes(730)), ["longer than its header"]),
    ("fewer-labels", "t10k-labels-idx1-ubyte.gz", gz_of(struct.pack(">HBBI", 0, 8, 1, 19) + bytes(19)),
     ["holds 20 images but", "holds 19 labels"]),
    ("no-images", "t10k-images-idx3-ubyte.gz", gz_of(struct.pack(">HBBIII", 0, 8, 3, 0, 6, 6)), ["holds no images"]),
    ("other-image-size", "t10k-images-idx3-ubyte.gz", gz_of(struct.pack(">HBBIII", 0, 8, 3, 20, 5, 5) + bytes(500)),
     ["holds 5x5 images, the training files 6x6"]),
    # --- 6. huge declared shapes: refused from the header, before anything is allocated or decompressed
    ("2**31-items-raw", "t10k-labels-idx1-ubyte", struct.pack(">HBBI", 0, 8, 1, 2**31) + bytes(20),
     ["truncated", "(2147483648,)"]),
    ("2**31-items-gz", "t10k-labels-idx1-ubyte.gz", gz_of(struct.pack(">HBBI", 0, 8, 1, 2**31) + bytes(20)),
     ["(2147483648,)", "more than a gzip file of"]),
    ("max-dims-gz", "t10k-images-idx3-ubyte.gz", gz_of(struct.pack(">HBBIII", 0, 8, 3, *[2**32 - 1] * 3)),
     ["more than a gzip file of"]),
]


@pytest.mark.parametrize("name, file, content, fragments", IDX_CASES, ids=[c[0] for c in IDX_CASES])
def test_a_damaged_idx_file_is_one_line(tmp_path, name, file, content, fragments):
    root = fashion_dir(tmp_path / "f", packed=file.endswith(".gz"))
    (root / file).write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_dataset(f"fashion-mnist:{root}")
    assert file in one_line(e)
    for fragment in fragments:
        assert fragment in one_line(e)


def test_a_damaged_idx_file_stops_distill_with_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = fashion_dir(tmp_path / "f")
    raw_named_gz(root)  # readable: by content
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    result = run("distill", "--data", f"fashion-mnist:{root}", "--out", "run", "-q")
    assert_user_error(result, "train-images-idx3-ubyte.gz", "cannot be read as an IDX file")
    assert not (tmp_path / "run").exists()


def test_an_idx_header_larger_than_the_memory_is_refused(tmp_path, monkeypatch):
    root = fashion_dir(tmp_path / "f")
    monkeypatch.setattr(decoded, "_memory_bytes", lambda: 1000)
    with pytest.raises(ConfigError) as e:
        load_dataset(f"fashion-mnist:{root}")
    assert "more than this machine's memory" in one_line(e)


# --- 6. npz: huge declared shapes, object arrays, members that are not arrays --------------------------------------

def npy_bytes(shape, descr="|u1", payload: bytes = b"") -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": descr, "fortran_order": False, "shape": shape})
    return out.getvalue() + payload


def write_zip(path: Path, members: dict, compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path




def y_npy(n: int = 40) -> bytes:
    out = io.BytesIO()
    np.save(out, np.arange(n) % 4)
    return out.getvalue()


@pytest.mark.parametrize("members, fragments", [
    ({"x.npy": npy_bytes((10**12, 28, 28), payload=bytes(100)), "y.npy": y_npy()},
     ["x.npy declares shape (1000000000000, 28, 28)", "but holds 100 bytes"]),
    ({"x.npy": npy_bytes((40, 6, 6), payload=bytes(1440)), "y.npy": npy_bytes((2**62,), "<i8", bytes(8))},
     ["y.npy declares shape (4611686018427387904,)"]),
    ({"x.npy": npy_bytes((40, 6, 6), payload=bytes(100)), "y.npy": y_npy()}, ["x.npy declares", "holds 100 bytes"]),
    ({"x": b"not an array", "y.npy": y_npy()}, ["x is not a NumPy array"]),
    ({"x.npy": npy_bytes((40, 6, 6), "|O", bytes(40 * 36 * 8)), "y.npy": y_npy()}, ["x.npy holds object arrays"]),
])
def test_a_crafted_npz_is_refused_before_allocating(tmp_path, members, fragments):
    for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        path = write_zip(tmp_path / "d.npz", members, compression)
        with pytest.raises(ConfigError) as e:
            load_dataset(f"npz:{path}")
        for fragment in ["d.npz", *fragments]:
            assert fragment in one_line(e)


def test_npz_object_arrays_are_refused_without_unpickling(tmp_path, monkeypatch):
    from tests.test_bad_input import Payload

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    x = np.empty((40,), dtype=object)
    x[:] = [Payload(marker)] * 40
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(40) % 4)
    result = run("distill", "--data", "npz:d.npz", "--out", "run", "-q")
    assert_user_error(result, "d.npz", "object arrays", "never")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_an_npz_larger_than_the_memory_is_refused(tmp_path, monkeypatch):
    np.savez(tmp_path / "d.npz", x=np.zeros((40, 6, 6), np.uint8), y=np.arange(40) % 4)
    monkeypatch.setattr(decoded, "_memory_bytes", lambda: 1000)
    with pytest.raises(ConfigError) as e:
        load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert "x.npy has shape (40, 6, 6)" in one_line(e) and "more than this machine's memory" in one_line(e)


def test_a_good_npz_still_loads_stored_or_compressed(tmp_path):
    x, y = np.random.default_rng(0).integers(0, 256, (40, 6, 6)).astype(np.uint8), np.arange(40) % 4
    np.savez(tmp_path / "a.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "b.npz", x=x, y=y.astype(np.float32))  # whole-number float labels
    a, b = load_dataset(f"npz:{tmp_path / 'a.npz'}"), load_dataset(f"npz:{tmp_path / 'b.npz'}")
    np.testing.assert_array_equal(a.test.x, b.test.x)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    assert a.num_classes == 4
