import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgekd import data, models
from edgekd.core.errors import CheckpointError, ConfigError, MissingFileError, UnknownNameError

FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_digits_split_is_fixed_stratified_and_normalized():
    a, b = data.load_dataset("digits", seed=0), data.load_dataset("digits", seed=0)
    assert (len(a.train), len(a.val), len(a.test)) == (1295, 143, 359)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    assert not np.array_equal(a.test.y, data.load_dataset("digits", seed=1).test.y)
    counts = np.bincount(a.test.y, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37  # every class keeps its 20% share
    assert abs(float(a.train.x.mean())) < 1e-4 and float(a.train.x.std()) == pytest.approx(1.0, abs=1e-3)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_and_fashion_layout(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    ds = data.load_dataset(f"fashion-mnist:{tmp_path}")
    assert len(ds.test) == 10 and len(ds.train) + len(ds.val) == 40 and ds.classes[9] == "Ankle boot"
    assert ds.flip_augment


def test_truncated_idx_is_an_error(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBBI", 0, 8, 1, 100) + b"\x00" * 10)
    with pytest.raises(ConfigError, match="truncated"):
        data.read_idx(path)


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist():
    ds = data.load_dataset("fashion-mnist")
    assert len(ds.test) == 10000 and len(ds.train) + len(ds.val) == 60000 and ds.input_shape == (1, 28, 28)


def test_npz_dataset(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (200, 12, 12)).astype(np.uint8), y=np.arange(200) % 4)
    ds = data.load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert ds.num_classes == 4 and ds.input_shape == (1, 12, 12) and len(ds.test) == 40
    np.savez(tmp_path / "bad.npz", images=np.zeros(3))
    with pytest.raises(ConfigError, match="must hold arrays 'x' and 'y'"):
        data.load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    with pytest.raises(MissingFileError):
        data.load_dataset("npz:/nonexistent.npz")


@pytest.mark.parametrize("spec", ["cnn-teacher", "cnn-student", "resnet-student", "mlp-student",
                                  "torchvision:resnet18", "torchvision:mobilenet_v2"])
def test_models_adapt_to_channels_and_classes(spec):
    model = models.build_model(spec, 7, (1, 32, 32)).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_student_is_a_fraction_of_the_teacher():
    t = models.count_params(models.build_model("cnn-teacher", 10, (1, 28, 28)))
    s = models.count_params(models.build_model("cnn-student", 10, (1, 28, 28)))
    assert s < 0.05 * t


def make_tiny(num_classes=10, in_channels=1):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


def test_module_callable_spec():
    model = models.build_model("tests.test_data_models:make_tiny", 3, (2, 8, 8))
    assert model(torch.randn(1, 2, 8, 8)).shape == (1, 3)
    with pytest.raises(ConfigError, match="cannot load model callable"):
        models.build_model("tests.test_data_models:nope", 3, (2, 8, 8))


def test_unknown_model_suggests():
    with pytest.raises(UnknownNameError, match="did you mean 'cnn-student'"):
        models.build_model("cnn-studnt", 10, (1, 8, 8))


def test_checkpoint_round_trip_and_plain_state_dict(tmp_path):
    model = models.build_model("cnn-student", 10, (1, 8, 8))
    meta = {"arch": "cnn-student", "num_classes": 10, "input_shape": [1, 8, 8]}
    models.save_checkpoint(tmp_path / "m.pt", model.state_dict(), meta)
    loaded, got_meta = models.load_model(tmp_path / "m.pt")
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    assert models.load_checkpoint(tmp_path / "plain.pt")["format"] == "state_dict"
    with pytest.raises(CheckpointError, match="no architecture"):
        models.load_model(tmp_path / "plain.pt")


def test_corrupt_checkpoint(tmp_path):
    models.save_checkpoint(tmp_path / "m.pt", models.build_model("cnn-student", 10, (1, 8, 8)).state_dict(), {})
    (tmp_path / "c.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:300])  # truncated archive
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        models.load_checkpoint(tmp_path / "c.pt")
    (tmp_path / "g.pt").write_bytes(b"not a checkpoint")  # bytes the safe unpickler rejects
    with pytest.raises(CheckpointError, match="refusing to load"):
        models.load_checkpoint(tmp_path / "g.pt")
