"""Backends: registry, ONNX Runtime session config and ORT format, TensorRT build plans (pure),
the compile command's host behaviour, and TensorRT engines where a GPU and tensorrt exist."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgekd import catalog
from edgekd.backends import backend_names, get_backend, get_runner
from edgekd.backends import onnxruntime as ortb
from edgekd.backends import tensorrt as trtb
from edgekd.core.errors import EdgekdError, MissingExtraError
from edgekd.core.fsutil import sha256_file

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _tiny_onnx(path, batch="batch"):
    """x -> Relu -> y, float32 [batch, 4]."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


# --- registry ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["onnxruntime", "tensorrt", "qonnx"])
def test_every_catalog_backend_is_registered(name):
    assert name in backend_names()
    spec = get_backend(name)
    assert spec.extra and spec.package


def test_every_target_backend_has_a_runner_module():
    for target in catalog.list_targets():
        runner = get_runner(target.backend)  # tensorrt's module imports without tensorrt
        for method in ("load", "run", "timed_call", "input_info", "describe_environment"):
            assert callable(getattr(runner, method))


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_tensorrt_missing_is_one_line_with_install_hint(tmp_path):
    with pytest.raises(MissingExtraError) as e:
        trtb.import_tensorrt()
    line = e.value.one_line()
    assert "pip install 'edgekd[tensorrt]'" in line and "JetPack" in line and "\n" not in line


def test_tensorrt_runner_refuses_an_uncompiled_bundle(tmp_path):
    with pytest.raises(EdgekdError) as e:
        trtb.RUNNER.load(_tiny_onnx(tmp_path / "model.onnx"))
    assert "compiled: false" in e.value.message and "edgekd compile" in e.value.hint


# --- ONNX Runtime: session config in the model, ORT format ------------------------------------------

def test_session_config_round_trip(tmp_path):
    path = _tiny_onnx(tmp_path / "m.onnx")
    assert ortb.session_config(path) == {}
    ortb.with_session_config(path, ortb.X64_EXACT_INT8)
    assert ortb.session_config(path) == {"session.x64quantprecision": "1"}
    session = ortb.make_session(path, threads=1)
    assert session._edgekd_config == {"session.x64quantprecision": "1"}
    assert ortb.describe_environment(session)["session_config"] == {"session.x64quantprecision": "1"}


def test_ort_format_keeps_results_and_config(tmp_path):
    path = ortb.with_session_config(_tiny_onnx(tmp_path / "m.onnx"), ortb.X64_EXACT_INT8)
    ort_path = ortb.to_ort_format(path, tmp_path / "m.ort", platform="arm64")
    assert ort_path.suffix == ".ort" and ort_path.read_bytes()[4:8] == b"ORTM"
    assert ortb.session_config(ort_path) == {"session.x64quantprecision": "1"}
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(ortb.run(ortb.make_session(ort_path), x), np.maximum(x, 0))
    with pytest.raises(EdgekdError, match="unknown ORT format platform"):
        ortb.to_ort_format(path, tmp_path / "n.ort", platform="riscv")


def test_new_ort_options_validate():
    arm = catalog.load_target("onnxruntime-arm")
    assert arm.options["x64_exact_int8"] is True and arm.options["ort_format"] is True
    with pytest.raises(EdgekdError, match="ort_platform"):
        catalog.parse_target({"backend": "onnxruntime", "flavour": "qdq", "options": {"ort_platform": "mips"}},
                             "t", "t.toml")


# --- TensorRT: what to build, per version (pure) --------------------------------------------------------

@pytest.mark.parametrize("version, typed, network_flag, flags", [
    ("8.5.2", False, False, ["INT8", "FP16"]),  # Xavier, JetPack 5.1
    ("10.3.0", False, False, ["INT8", "FP16"]),  # JetPack 6.x
    ("10.11.0", False, False, ["INT8", "FP16"]),
    ("10.12.0", True, True, []),  # weak typing deprecated: STRONGLY_TYPED network, no precision flags
    ("10.15.1", True, True, []),
    ("11.0.0", True, False, []),  # always strongly typed; INT8/FP16 flags removed
])
def test_build_plan_branches_on_version(version, typed, network_flag, flags):
    plan = trtb.build_plan(version, {"fp16": True})
    assert (plan.strongly_typed, plan.network_flag, plan.builder_flags) == (typed, network_flag, flags)
    assert bool(plan.notes) == typed  # strongly typed: the fp16 option is reported as ignored


def test_build_plan_without_fp16_and_with_dla():
    assert trtb.build_plan("10.3", {"fp16": False}).builder_flags == ["INT8"]
    plan = trtb.build_plan("10.3", {"dla_core": 1, "gpu_fallback": True}, dla_cores=2)
    assert plan.dla_core == 1 and "GPU_FALLBACK" in plan.builder_flags and plan.precision.endswith("dla1")
    nano = trtb.build_plan("10.3", {"dla_core": 0}, dla_cores=0)  # Orin Nano has no DLA
    assert nano.dla_core == -1 and "no" not in nano.precision and any("DLA" in n for n in nano.notes)


def test_timing_cache_is_keyed_by_device_version_and_precision():
    a = trtb.timing_cache_name("Orin (nvgpu)", "10.3.0", "int8+fp16")
    assert a == "timing-orin-nvgpu-trt10.3.0-int8-fp16.cache"
    assert len({a, trtb.timing_cache_name("Orin (nvgpu)", "10.3.0", "int8"),
                trtb.timing_cache_name("NVIDIA H100", "10.3.0", "int8+fp16"),
                trtb.timing_cache_name("Orin (nvgpu)", "11.0.0", "int8+fp16")}) == 4


def test_layer_precisions_reads_trt10_and_trt11_inspector_json():
    info = {"Layers": [
        {"Name": "conv1", "Inputs": [{"Format/Datatype": "Int8 NC/32HW32"}], "Outputs": [{"Format/Datatype": "Int8 NC/32HW32"}]},
        {"Name": "head", "Inputs": [{"Format/Datatype": "Int8"}], "Outputs": [{"Format/Datatype": "Float"}]},
        {"Name": "softmax", "Inputs": [{"DataType": "Half"}], "Outputs": [{"Format": "Linear", "DataType": "Half"}]},
    ]}
    summary = trtb.layer_precisions(json.dumps(info))
    assert summary["layers"] == 3 and summary["int8_layers"] == ["conv1", "head"]
    assert summary["by_output_precision"] == {"Int8": 1, "FP32": 1, "FP16": 1}
    assert trtb.layer_precisions({"Layers": ["a", "b"]})["by_output_precision"] == {"unknown": 2}


# --- a TensorRT bundle on a host without TensorRT ---------------------------------------------------------

def _fake_trt_bundle(root):
    """A minimal tensorrt bundle as export writes it on a host (compiled: false)."""
    root.mkdir()
    _tiny_onnx(root / "model.onnx")
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    np.savez_compressed(root / "eval.npz", x=x, y=np.zeros(8, dtype=np.int64))
    np.save(root / "reference_logits.npy", np.maximum(x, 0))
    manifest = {"name": root.name, "target": "tensorrt-int8", "backend": "tensorrt", "format": "qdq",
                "model_file": "model.onnx", "weight_bits": 8, "act_bits": 8, "input_shape": [4], "input_name": "input",
                "classes": list("abcd"), "normalization": {"mean": [0], "std": [1]}, "torch_accuracy": 1.0,
                "parity": {"n": 8, "top1_agreement": 1.0, "max_abs_diff": 0.0}, "edgekd_version": "0",
                "compiled": False, "compile_command": f"edgekd compile {root.name}",
                "reference_file": "reference_logits.npy", "backend_options": {"fp16": True},
                "files": {p.name: sha256_file(p) for p in sorted(root.iterdir())}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_compile_without_tensorrt_is_one_line(tmp_path):
    from edgekd.cli import main

    bundle = _fake_trt_bundle(tmp_path / "b")
    result = CliRunner().invoke(main, ["compile", str(bundle)])
    assert result.exit_code == 2
    assert "pip install 'edgekd[tensorrt]'" in result.output and "Traceback" not in result.output


def test_bench_of_an_uncompiled_bundle_says_how_to_compile(tmp_path):
    from edgekd import bench

    bundle = _fake_trt_bundle(tmp_path / "b")
    rows = bench.bench_bundle(bundle, bench.resolve_settings(iterations=1, warmup=0, warmup_s=0, min_time_s=0))
    assert rows[0].status == "error" and "edgekd compile" in rows[0].error


def test_compile_refuses_other_backends(tmp_path):
    from edgekd import api

    bundle = _fake_trt_bundle(tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps(manifest | {"backend": "onnxruntime"}))
    with pytest.raises(EdgekdError, match="only TensorRT bundles"):
        api.compile_bundle(bundle)


# --- on a GPU with TensorRT ---------------------------------------------------------------------------

def _has_cuda_gpu() -> bool:
    try:
        cudart = trtb.import_cudart()
        err, count = cudart.cudaGetDeviceCount()
        return int(err) == 0 and count > 0
    except Exception:
        return False


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="needs the tensorrt package")
def test_engine_build_run_and_time(tmp_path):
    if not _has_cuda_gpu():
        pytest.skip("needs a CUDA GPU and cuda-python")
    bundle = _fake_trt_bundle(tmp_path / "b")
    from edgekd import api, bench

    manifest = api.compile_bundle(bundle)
    assert manifest["compiled"] is True and manifest["model_file"] == "model.engine"
    assert (bundle / "engine_layers.json").is_file() and manifest["engine"]["timing_cache"]
    assert manifest["engine_parity"]["top1_agreement"] == 1.0
    rows = bench.bench_bundle(bundle, bench.resolve_settings(iterations=5, warmup=1, warmup_s=0, min_time_s=0))
    assert rows[0].status == "ok" and rows[0].device_timing["gpu_compute_ms"]["mean"] > 0


def test_int8_cpu_flags_are_read_from_cpuinfo(monkeypatch):
    from edgekd.backends import host as backends

    x86 = "processor\t: 0\nflags\t\t: fpu sse avx2 fma avx512f avx512_vnni\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\nCPU part\t: 0xd0b\n"
    monkeypatch.setattr(backends, "_read", lambda path: x86)
    assert backends.int8_cpu_flags() == ["avx2", "avx512f", "avx512_vnni"]
    monkeypatch.setattr(backends, "_read", lambda path: arm)
    assert backends.int8_cpu_flags() == ["asimddp", "i8mm"]
    monkeypatch.setattr(backends, "_read", lambda path: None)
    assert backends.int8_cpu_flags() is None


# --- a backend defined here: one module (this class), one target file, and edgekd exports and benches through it

class _ReferenceBackend:
    """ONNX Runtime with every graph optimization off, as a separate runtime: the reference semantics of
    Brevitas's QCDQ graph. Defined in the test to prove that a backend plugs in without touching edgekd."""

    @staticmethod
    def make():
        from edgekd.backends import Backend, Compiled, Option
        from edgekd.backends.onnxruntime import OrtRunner

        class Reference(Backend):
            name, title, flavours = "reference", "Reference", ("qcdq",)
            package, extra, purpose = "onnxruntime", "device", "running a reference bundle"
            options = {"note": Option(str, "a free-text note stored in the manifest")}

            def runner(self):
                return OrtRunner(level="disabled")

            def compile(self, onnx_path, ctx):
                copy = onnx_path.with_name("model.ref.onnx")
                copy.write_bytes(onnx_path.read_bytes())
                ctx.log("reference: copied the graph unchanged")
                return Compiled(copy, {"fusion": {"available": False, "reason": "no optimization at all"}})

            def manifest_extras(self, ctx):
                return {"reference_note": ctx.target.options.get("note", "")}

        return Reference()


def test_a_backend_defined_outside_edgekd_exports_and_benches(tiny_run, tmp_path, monkeypatch):
    from edgekd import api, backends

    backend = _ReferenceBackend.make()
    monkeypatch.setattr(backends, "_REGISTERED", dict(backends._REGISTERED))
    backends.register_backend(backend)
    target = tmp_path / "reference-cpu.toml"
    target.write_text('backend = "reference"\nflavour = "qcdq"\nweight_bits = [2, 3, 4, 5, 6, 7, 8]\n'
                      'act_bits = [2, 3, 4, 5, 6, 7, 8]\n[options]\nnote = "plugged in from a test"\n')
    assert catalog.load_target(str(target)).backend == "reference"
    with pytest.raises(Exception, match="unknown key 'nte'"):  # options are checked by the backend's schema
        bad = tmp_path / "bad.toml"
        bad.write_text(target.read_text().replace("note =", "nte ="))
        catalog.load_target(str(bad))
    lines = []
    manifest = api.export(tiny_run[0], str(target), out=tmp_path / "bundle", log=lines.append)
    assert manifest["backend"] == "reference" and manifest["model_file"] == "model.ref.onnx"
    assert manifest["reference_note"] == "plugged in from a test" and "reference: copied the graph unchanged" in lines
    assert manifest["parity"]["top1_agreement"] >= 0.999
    [row] = api.bench([tmp_path / "bundle"], iterations=5, min_time_s=0.0, warmup=1, warmup_s=0.0)
    assert row["status"] == "ok" and row["backend"] == "reference" and row["source"] == "measured"
    assert row["accuracy"] == pytest.approx(manifest["runtime_accuracy"])
