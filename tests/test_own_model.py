"""Your model and your data, end to end (issue #12): a teacher trained outside edgekd and loaded as
ARCH=WEIGHTS, the teacher check, a student from weights with a new head, bounded bundles, and the
Python API with nn.Modules and torch Datasets. Tiny trees and tiny models, one epoch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgekd import api
from edgekd.cli import main
from edgekd.core.errors import EdgekdError
from edgekd.data import load_dataset
from edgekd.data.options import DataOptions
from edgekd.pipeline.evalset import eval_sample
from tests.own_models import pattern, tiny_net, train_plain, write_tree

MINE = "tests.own_models:tiny_net"
TINY = ["--bits", "8", "--epochs", "1", "--float-epochs", "0", "--batch-size", "16", "--workers", "0",
        "--augment", "none", "-q"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A 3-class grayscale PNG tree and two teachers trained with plain PyTorch: one right, and the
    same weights with the head's rows shuffled (another class order)."""
    root = tmp_path_factory.mktemp("own")
    write_tree(root / "t", per_class={"train": 16, "test": 4})
    data = load_dataset(f"imagefolder:{root / 't'}", options=DataOptions(augment="none", workers=0))
    x, y = data.train.take(range(len(data.train))), data.train.y
    teacher = train_plain(tiny_net(3, 1), x, y)
    torch.save(teacher.state_dict(), root / "teacher.pt")
    shuffled = {k: v.clone() for k, v in teacher.state_dict().items()}
    for key in ("5.weight", "5.bias"):
        shuffled[key] = shuffled[key][[1, 2, 0]]
    torch.save(shuffled, root / "shuffled.pt")
    torch.save(tiny_net(5, 1).state_dict(), root / "five.pt")  # a student pretrained on 5 classes
    return root


def test_eval_sample_is_stratified_seeded_and_bounded():
    y = np.repeat(np.arange(4), [100, 50, 30, 20])
    idx = eval_sample(y, 40, seed=3)
    assert len(idx) == 40 and len(set(idx)) == 40 and np.all(np.diff(idx) > 0)
    assert list(np.bincount(y[idx])) == [20, 10, 6, 4]
    np.testing.assert_array_equal(idx, eval_sample(y, 40, seed=3))
    assert not np.array_equal(idx, eval_sample(y, 40, seed=4))
    assert len(eval_sample(y, 7, 0)) == 7 and len(eval_sample(y, 10**6, 0)) == 200


def test_teacher_check_stops_a_shuffled_teacher_and_force_goes_on(tree, monkeypatch):
    monkeypatch.chdir(tree)
    common = ["distill", "--data", "imagefolder:t", "--student", MINE, *TINY]
    result = run(*common, "--teacher", f"{MINE}=shuffled.pt", "--out", "stopped")
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: teacher shuffled.pt: test accuracy") and "near chance (3 classes" in line
    for cause in ("normalization", "class order", "ant, bee, cat", "image size", "--force"):
        assert cause in line, line
    assert not (tree / "stopped").exists()
    forced = run(*common, "--teacher", f"{MINE}=shuffled.pt", "--out", "forced", "--force")
    assert forced.exit_code == 0, forced.output
    assert "distilling anyway (--force)" in forced.output
    good = run(*common, "--teacher", f"{MINE}=teacher.pt", "--out", "good")
    assert good.exit_code == 0, good.output
    metrics = json.loads((tree / "good" / "metrics.json").read_text())
    assert metrics["teacher_accuracy"] > 0.9 and metrics["teacher"] == "teacher.pt"


def test_student_from_weights_gets_a_new_head_and_exports_bounded(tree, monkeypatch):
    monkeypatch.chdir(tree)
    student = f"{MINE}=five.pt"
    result = run("distill", "--data", "imagefolder:t", "--teacher", f"{MINE}=teacher.pt", "--student", student,
                 *TINY[:-1], "--out", "s5")
    assert result.exit_code == 0, result.output
    assert "five.pt: the head 5 predicts 5 classes, the data has 3: it gets a new head" in result.output
    assert "new head" in (tree / "s5" / "log.txt").read_text()
    metrics = json.loads((tree / "s5" / "metrics.json").read_text())
    assert (metrics["student_arch"], metrics["student_weights"], metrics["new_head"]) == (MINE, "five.pt", True)
    meta = torch.load(tree / "s5" / "student.pt", weights_only=True)["meta"]
    assert (meta["arch"], meta["init_weights"], meta["classes"]) == (MINE, "five.pt", ["ant", "bee", "cat"])
    assert meta["data_options"]["augment"] == "none" and meta["transform"]["center_crop"] == [12, 12]
    refused = run("export", "s5", "--target", "cpu", "-q")  # code named in the run: named again
    assert refused.exit_code == 2 and "--student" in refused.output
    done = run("export", "s5", "--target", "cpu", "--student", student, "--eval-samples", "6", "--out", "b")
    assert done.exit_code == 0, done.output
    manifest = json.loads((tree / "b" / "manifest.json").read_text())
    with np.load(tree / "b" / "eval.npz") as f:
        assert f["x"].shape == (6, 1, 12, 12) and list(np.bincount(f["y"])) == [2, 2, 2]
    assert (manifest["eval_samples"], manifest["test_samples"], manifest["parity"]["n"]) == (6, 12, 6)
    assert 0 <= manifest["runtime_accuracy_full"] <= 1 and manifest["classes"] == ["ant", "bee", "cat"]
    assert manifest["transform"]["normalize"] == manifest["normalization"]
    rows = api.bench([tree / "b"], iterations=2, min_time_s=0, warmup=0, warmup_s=0)
    assert rows[0]["accuracy_source"] == "eval sample (6 of 12 test images)"
    assert rows[0]["accuracy_full"] == manifest["runtime_accuracy_full"]


def test_a_trained_float_model_is_a_student(tree, monkeypatch):
    monkeypatch.chdir(tree)
    trained = run("train", "--data", "imagefolder:t", "--arch", "cnn-student", "--epochs", "1", "--workers", "0",
                  "--augment", "none", "--out", "float", "-q")
    assert trained.exit_code == 0, trained.output
    result = run("distill", "--data", "imagefolder:t", "--method", "none", "--student", "float/model.pt", *TINY,
                 "--out", "from-float")
    assert result.exit_code == 0, result.output
    assert json.loads((tree / "from-float" / "metrics.json").read_text())["student_arch"] == "cnn-student"


def _tensors(n_per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    x = np.stack([pattern(c, 12, rng) for c in range(3) for _ in range(n_per_class)]).astype(np.float32)[:, None] / 255
    y = np.repeat(np.arange(3), n_per_class)
    return torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def test_api_takes_modules_and_torch_datasets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_set, test_set = _tensors(16, 0), _tensors(4, 1)
    teacher = train_plain(tiny_net(3, 1), train_set.tensors[0].numpy(), train_set.tensors[1].numpy())
    student = tiny_net(3, 1)
    data = api.TorchData(torch.utils.data.DataLoader(train_set, batch_size=8), test_set, classes=["a", "b", "c"],
                         mean=[0.0], std=[1.0])
    opts = api.DistillOptions(weight_bits=8, act_bits=8, epochs=1, float_epochs=0, batch_size=16, progress=False)
    lines = []
    m = api.distill(opts, out=tmp_path / "run", teacher=teacher, student=student, data=data, log=lines.append)
    assert m["dataset"] == "python-api" and m["student"] == "python-api" and m["teacher"] == "python-api"
    assert m["teacher_accuracy"] > 0.9 and any("teacher python-api: test accuracy" in s for s in lines)
    meta = torch.load(tmp_path / "run" / "student.pt", weights_only=True)["meta"]
    assert meta["arch"] == "python-api" and meta["classes"] == ["a", "b", "c"]
    with pytest.raises(EdgekdError, match="Python API"):
        api.export(tmp_path / "run", "cpu", data=data)  # the student module is needed again
    with pytest.raises(EdgekdError, match="Python API"):
        api.export(tmp_path / "run", "cpu", student=student)  # and so is the data
    manifest = api.export(tmp_path / "run", "cpu", out=tmp_path / "b", student=student, data=data)
    assert manifest["parity"]["top1_agreement"] == 1.0 and manifest["test_samples"] == 12
    with pytest.raises(EdgekdError, match="nn.Module"):
        api.distill(opts, student="not a module", data=data)


def test_api_exports_the_float_student_of_a_module_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = api.TorchData(_tensors(16, 0), _tensors(4, 1), classes=["a", "b", "c"], mean=[0.0], std=[1.0])
    opts = api.DistillOptions(method="none", weight_bits=8, act_bits=8, epochs=1, float_epochs=1, batch_size=16,
                              progress=False)
    m = api.distill(opts, out=tmp_path / "run", student=tiny_net(3, 1), data=data)
    # the float student of a python-api run is rebuilt from the module given again (it was an error:
    # the module was taken for an architecture name)
    manifest = api.export(m["run_dir"], "cpu", out=tmp_path / "fp32", student=tiny_net(3, 1), data=data,
                          float_model=True)
    assert manifest["format"] == "fp32" and manifest["parity"]["top1_agreement"] == 1.0
    with pytest.raises(EdgekdError, match="Python API"):
        api.export(m["run_dir"], "cpu", out=tmp_path / "fp32b", data=data, float_model=True)


def test_api_student_trained_keeps_the_module_as_the_float_student(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_set, test_set = _tensors(16, 0), _tensors(4, 1)
    data = api.TorchData(train_set, test_set, classes=["a", "b", "c"], mean=[0.0], std=[1.0])
    trained = train_plain(tiny_net(3, 1), train_set.tensors[0].numpy(), train_set.tensors[1].numpy())
    opts = api.DistillOptions(method="none", weight_bits=8, act_bits=8, epochs=1, float_epochs=0, batch_size=16,
                              progress=False)
    lines = []
    m = api.distill(opts, out=tmp_path / "run", student=trained, data=data, student_trained=True, log=lines.append)
    saved = torch.load(tmp_path / "run" / "float.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in trained.state_dict().items())  # the module as given
    assert m["student_float_accuracy"] is not None and any("(from its weights) test accuracy" in s for s in lines)
    plain = api.distill(opts, out=tmp_path / "plain", student=tiny_net(3, 1), data=data)
    assert not (tmp_path / "plain" / "float.pt").exists() and plain["student_float_accuracy"] is None
    with pytest.raises(EdgekdError, match="student_trained=True needs a student= module"):
        api.distill(opts, out=tmp_path / "none", data=data, student_trained=True)
