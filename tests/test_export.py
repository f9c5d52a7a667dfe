"""Export contract: bundle layout, manifest keys, parity measured on the test split, atomicity."""

import json

import numpy as np
import pytest

from edgekd import api
from edgekd.core.errors import ParityError

MANIFEST_KEYS = {"target", "backend", "format", "weight_bits", "act_bits", "input_shape", "classes", "normalization",
                 "torch_accuracy", "parity", "edgekd_version", "model_file", "files", "input_name"}


@pytest.fixture(scope="module")
def bundle(tiny_run, tmp_path_factory):
    run_dir, _ = tiny_run
    out = tmp_path_factory.mktemp("bundle") / "b"
    return api.export(run_dir, "onnxruntime-cpu", out=out), out


def test_bundle_contract(bundle, tiny_run):
    manifest, out = bundle
    on_disk = json.loads((out / "manifest.json").read_text())
    assert MANIFEST_KEYS <= set(on_disk)
    assert on_disk["weight_bits"] == 4 and on_disk["act_bits"] == 4 and on_disk["input_shape"] == [1, 8, 8]
    assert set(on_disk["files"]) == {"model.onnx", "model.opt.onnx", "eval.npz"}
    with np.load(out / "eval.npz") as f:
        assert f["x"].shape == (359, 1, 8, 8) and f["x"].dtype == np.float32 and f["y"].shape == (359,)


def test_parity_is_measured_on_the_whole_test_split(bundle, tiny_run):
    manifest, _ = bundle
    p = manifest["parity"]
    assert p["n"] == 359
    assert p["top1_agreement"] >= 0.999
    assert p["max_abs_diff"] < 0.1
    # The runtime's accuracy is what PyTorch's fake-quant model scores, within the disagreements.
    assert abs(manifest["runtime_accuracy"] - manifest["torch_accuracy"]) <= p["disagreements"] / p["n"]
    assert manifest["torch_accuracy"] == pytest.approx(tiny_run[1]["student_accuracy"], abs=1e-6)


def test_export_is_fully_fused_for_ort(bundle):
    manifest, _ = bundle
    assert manifest["fusion"]["float_compute"] == 0


def test_runtime_output_matches_torch(bundle, tiny_run):
    import onnxruntime as ort
    import torch

    manifest, out = bundle
    model, _ = api.load_student(tiny_run[0])
    with np.load(out / "eval.npz") as f:
        x = f["x"][:64]
    session = ort.InferenceSession(str(out / manifest["model_file"]), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0]
    want = model(torch.from_numpy(x)).detach().numpy()
    assert (got.argmax(1) == want.argmax(1)).all()
    np.testing.assert_allclose(got, want, atol=0.1)


def test_failed_parity_keeps_previous_bundle(bundle, tiny_run, tmp_path):
    manifest, out = bundle
    before = (out / "manifest.json").read_bytes()
    strict = tmp_path / "strict.toml"
    strict.write_text('backend = "onnxruntime"\nflavour = "qcdq"\nweight_bits = [2, 3, 4, 5, 6, 7, 8]\n'
                      'act_bits = [2, 3, 4, 5, 6, 7, 8]\n[tolerance]\nmin_top1_agreement = 1.0\n'
                      'max_abs_diff = 1e-12\n')
    with pytest.raises(ParityError, match="max abs diff"):
        api.export(tiny_run[0], str(strict), out=out)
    assert (out / "manifest.json").read_bytes() == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
