"""Models from weights files (issue #12): ARCH=WEIGHTS for torchvision and module:callable
architectures, every layout a training script saves, the mismatch errors, the new head."""

from __future__ import annotations

import sys

import pytest
import torch
import torchvision

from edgekd import models
from edgekd.core.errors import CheckpointError, ConfigError, MissingExtraError
from tests.own_models import tiny_net

RESNET = "torchvision:resnet18"
MINE = "tests.own_models:tiny_net"


def _layouts(state: dict) -> dict:
    """What training scripts save: a plain state_dict, wrappers, DataParallel prefixes."""
    return {"plain.pt": state, "wrapped.pth": {"state_dict": state, "epoch": 7},
            "model.pth": {"model": state, "optimizer": {"lr": 0.1, "momentum": 0.9}},
            "dp.pt": {f"module.{k}": v for k, v in state.items()}}


@pytest.mark.parametrize("arch, build, shape", [
    (RESNET, lambda: torchvision.models.resnet18(num_classes=3), (3, 32, 32)),
    (MINE, lambda: tiny_net(3, 1), (1, 12, 12)),
], ids=["torchvision", "module-callable"])
def test_every_layout_loads_the_same_weights(arch, build, shape, tmp_path):
    torch.manual_seed(1)
    source = build()
    state = source.state_dict()
    files = []
    for name, obj in _layouts(state).items():
        torch.save(obj, tmp_path / name)
        files.append(tmp_path / name)
    try:
        from safetensors.torch import save_file
    except ImportError:
        pass
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
        files.append(tmp_path / "w.safetensors")
    for file in files:
        built = models.from_spec(f"{arch}={file}", 3, shape, student=False)
        assert (built.arch, built.weights, built.new_head) == (arch, str(file), False)
        for k, v in built.model.state_dict().items():
            assert torch.equal(v, state[k]), (file.name, k)


def test_a_student_with_another_class_count_gets_a_new_head(tmp_path):
    torch.save(tiny_net(5, 1).state_dict(), tmp_path / "w.pt")
    lines = []
    built = models.from_spec(f"{MINE}={tmp_path / 'w.pt'}", 3, (1, 12, 12), student=True, log=lines.append)
    assert built.new_head and built.model[-1].out_features == 3
    assert any("predicts 5 classes, the data has 3: it gets a new head" in line for line in lines)
    with pytest.raises(CheckpointError, match="does not fit") as e:  # a teacher keeps its head
        models.from_spec(f"{MINE}={tmp_path / 'w.pt'}", 3, (1, 12, 12), student=False)
    line = e.value.one_line()
    assert "5.weight is (5, 32) in the file, (3, 32) in the model" in line  # the key and both shapes
    assert "likely cause: the class count (the file's head predicts 5 classes)" in line


def test_rgb_stem_into_grayscale_data_is_summed(tmp_path):
    rgb = torchvision.models.resnet18(num_classes=3)
    torch.save(rgb.state_dict(), tmp_path / "r.pth")
    lines = []
    built = models.from_spec(f"{RESNET}={tmp_path / 'r.pth'}", 3, (1, 32, 32), student=False, log=lines.append)
    assert torch.allclose(built.model.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    assert any("summed over the colour channels" in line for line in lines)


def test_mismatches_name_keys_shapes_and_likely_cause(tmp_path):
    torch.save(tiny_net(3, 1).state_dict(), tmp_path / "gray.pt")
    with pytest.raises(CheckpointError) as e:
        models.from_spec(f"{MINE}={tmp_path / 'gray.pt'}", 3, (3, 12, 12), student=False)
    assert "0.weight is (8, 1, 3, 3) in the file, (8, 3, 3, 3) in the model" in e.value.one_line()
    assert "input channels" in e.value.one_line() and "--channels 1" in e.value.one_line()
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match="keys missing from the file") as e:
        models.from_spec(f"torchvision:resnet34={tmp_path / 'r18.pth'}", 3, (3, 32, 32), student=False)
    assert "layer1.2" in e.value.one_line() and "ARCH is the architecture" in e.value.one_line()
    with pytest.raises(CheckpointError, match="unexpected keys"):
        models.from_spec(f"{MINE}={tmp_path / 'r18.pth'}", 3, (3, 12, 12), student=False)


def test_weights_without_an_architecture_say_how_to_name_it(tmp_path):
    torch.save(tiny_net(3, 1).state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="no architecture") as e:
        models.from_spec(str(tmp_path / "w.pt"), 3, (1, 12, 12), student=True)
    assert "--student ARCH=" in e.value.one_line()


def test_an_edgekd_checkpoint_alone_names_its_architecture(tmp_path):
    meta = {"arch": "cnn-student", "num_classes": 5, "input_shape": [1, 12, 12]}
    models.save_checkpoint(tmp_path / "model.pt", models.build_model("cnn-student", 5, (1, 12, 12)).state_dict(), meta)
    built = models.from_spec(str(tmp_path / "model.pt"), 3, (1, 12, 12), student=True)
    assert built.arch == "cnn-student" and built.new_head
    meta["arch"] = MINE  # code named in a file: only with trust_code
    models.save_checkpoint(tmp_path / "code.pt", tiny_net(5, 1).state_dict(), meta)
    with pytest.raises(models.UntrustedCodeError):
        models.from_spec(str(tmp_path / "code.pt"), 3, (1, 12, 12), student=True)
    assert models.from_spec(str(tmp_path / "code.pt"), 3, (1, 12, 12), student=True, trust_code=True).arch == MINE


def test_spec_syntax():
    assert models.split_weights("torchvision:resnet18=t.pth") == ("torchvision:resnet18", "t.pth")
    assert models.split_weights("mypkg.nets:make=w.pt") == ("mypkg.nets:make", "w.pt")
    assert models.split_weights("runs/x/model.pt") == (None, "runs/x/model.pt")
    assert models.split_weights("cnn-student") == ("cnn-student", None)
    with pytest.raises(ConfigError, match="needs both"):
        models.split_weights("torchvision:resnet18=")
    assert not models.names_code("timm:resnet18") and models.names_code("mypkg.nets:make=w.pt")


def test_timm_without_the_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(MissingExtraError) as e:
        models.build_model("timm:resnet18", 3, (3, 32, 32))
    assert "pip install 'edgekd[timm]'" in e.value.one_line()


def test_timm_weights_file(tmp_path):
    timm = pytest.importorskip("timm")
    source = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    torch.save(source.state_dict(), tmp_path / "t.pth")
    built = models.from_spec(f"timm:resnet10t={tmp_path / 't.pth'}", 3, (3, 32, 32), student=False)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in built.model.state_dict().items())
