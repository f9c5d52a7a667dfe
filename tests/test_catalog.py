"""The target/profile catalog: tests generated from the shipped files, bad inputs, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekd import catalog
from edgekd.backends import backend_names, get_backend
from edgekd.cli import main
from edgekd.core.errors import ConfigError, EdgekdError, IncompatibleError, MissingFileError, UnknownNameError

TARGETS = catalog.target_names()
PROFILES = catalog.profile_names()


def test_catalog_is_not_empty_and_lives_in_data_dir():
    assert {"onnxruntime-cpu", "onnxruntime-arm", "tensorrt-int8", "qonnx-finn", "qonnx-hls4ml"} <= set(TARGETS)
    assert {"host-cpu", "rpi4", "rpi5", "jetson-orin-nano-8gb", "pynq-z2", "zcu104", "kv260"} <= set(PROFILES)
    for kind in ("targets", "profiles"):
        assert sorted(p.stem for p in catalog.data_dir(kind).glob("*.toml"))


# --- generated from the catalog -------------------------------------------------------------------


@pytest.mark.parametrize("name", TARGETS)
def test_target_parses_and_is_consistent(name):
    t = catalog.load_target(name)
    assert t.name == name and Path(t.path).stem == name
    assert t.backend in backend_names()
    assert t.flavour in get_backend(t.backend).flavours
    for kind in ("weight", "act"):
        assert set(t.accelerated(kind)) <= set(getattr(t, f"{kind}_bits"))
    assert 0 < t.tolerance.min_top1_agreement <= 1
    assert set(t.options) <= set(get_backend(t.backend).options)
    json.dumps(catalog.as_dict(t))


@pytest.mark.parametrize("name", TARGETS)
def test_target_file_explains_itself(name):
    text = (catalog.data_dir("targets") / f"{name}.toml").read_text()
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert len(comments) >= 5, "each target opens with a comment block explaining its conventions"


@pytest.mark.parametrize("name", TARGETS)
def test_target_runs_its_own_accelerated_bits_cleanly(name):
    t = catalog.load_target(name)
    w, a = max(t.accelerated("weight")), max(t.accelerated("act"))
    assert not [f for f in catalog.preflight(t, w, a) if f["level"] != "info"]


@pytest.mark.parametrize("name", PROFILES)
def test_profile_parses_and_names_existing_targets(name):
    p = catalog.load_profile(name)
    assert p.name == name and p.targets
    for target in p.targets:
        assert target in TARGETS  # canonical names after loading
        catalog.load_target(target)
    json.dumps(catalog.as_dict(p))


@pytest.mark.parametrize("name", PROFILES)
def test_profile_facts_have_sources_and_threads_match_cores(name):
    p = catalog.load_profile(name)
    if p.hardware.get("arch") == "host":
        return  # read at bench time
    assert p.hardware.get("sources"), f"{name}: hardware facts need sources"
    text = (catalog.data_dir("profiles") / f"{name}.toml").read_text()
    assert text.startswith("#") and "Source" in text
    assert p.bench.threads == p.hardware["cpu"]["cores"]
    if p.hardware.get("accelerator", {}).get("kind") == "fpga":
        assert {"part", "lut", "ff", "bram_36k", "dsp"} <= set(p.hardware["fpga"])


@pytest.mark.parametrize("name", PROFILES)
def test_profile_preferred_target_takes_8_bits(name):
    p = catalog.load_profile(name)
    assert not [f for f in catalog.preflight(p.targets[0], 8, 8) if f["level"] == "error"]


def _names_and_aliases(kind):
    names = catalog.target_names() if kind == "targets" else catalog.profile_names()
    load = catalog.load_target if kind == "targets" else catalog.load_profile
    return names, [a for n in names for a in load(n).aliases]


def test_aliases_are_unique_and_never_shadow_a_name():
    t_names, t_aliases = _names_and_aliases("targets")
    p_names, p_aliases = _names_and_aliases("profiles")
    every = t_names + t_aliases + p_names + p_aliases
    assert len(every) == len(set(every)), sorted(x for x in every if every.count(x) > 1)


@pytest.mark.parametrize("alias,expected", [("cpu", "onnxruntime-cpu"), ("rpi", "onnxruntime-arm"),
                                            ("jetson", "tensorrt-int8"), ("fpga", "qonnx-finn"),
                                            ("hls4ml", "qonnx-hls4ml")])
def test_short_names_resolve(alias, expected):
    assert catalog.load_target(alias).name == expected


def test_profile_name_as_target_means_its_preferred_target():
    assert catalog.load_target("rpi5").name == "onnxruntime-arm"
    assert catalog.load_target("orin-nano").name == "tensorrt-int8"
    assert catalog.resolve_target("pi5")[2] == "profile:rpi5"
    assert catalog.load_profile("pi5").name == "rpi5"


def test_catalog_module_does_not_import_torch():
    code = "import sys, edgekd.catalog as c; c.list_profiles(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- bad inputs ---------------------------------------------------------------------------------------

GOOD_TARGET = """
backend = "onnxruntime"
flavour = "qcdq"
weight_bits = [4, 8]
act_bits = [8]
[tolerance]
min_top1_agreement = 0.99
"""


def _top(extra: str) -> str:
    """GOOD_TARGET with extra top-level lines (before the first table)."""
    return GOOD_TARGET.replace("[tolerance]", extra + "\n[tolerance]")


def _write(tmp_path: Path, text: str, name: str = "mine.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_users_own_target_file(tmp_path):
    t = catalog.load_target(_write(tmp_path, GOOD_TARGET, "my-ort.toml"))
    assert (t.name, t.weight_bits, t.accelerated("weight")) == ("my-ort", (4, 8), (4, 8))


def test_users_own_profile_file_with_aliases_and_paths(tmp_path):
    _write(tmp_path, GOOD_TARGET, "my-ort.toml")
    p = catalog.load_profile(_write(tmp_path, 'targets = ["jetson", "my-ort.toml"]\n[hardware]\narch = "aarch64"\n'))
    assert p.targets[0] == "tensorrt-int8" and p.targets[1] == str((tmp_path / "my-ort.toml").resolve())


@pytest.mark.parametrize("text,needle", [
    (GOOD_TARGET.replace("min_top1_agreement", "min_top1_agreemnt"), "did you mean 'min_top1_agreement'"),
    (_top('flavor = "qdq"'), "did you mean 'flavour'"),
    (GOOD_TARGET + '[quant]\nweight_scaling = "per_chanel"\n', "did you mean 'per_channel'"),
    (GOOD_TARGET + '[options]\ngraph_optimisation_level = "all"\n', "did you mean 'graph_optimization_level'"),
    (GOOD_TARGET + '[options]\ngraph_optimization_level = "fast"\n', "must be one of disabled, basic"),
    (GOOD_TARGET.replace('"onnxruntime"', '"onnxruntim"'), "did you mean 'onnxruntime'"),
    (GOOD_TARGET.replace('"qcdq"', '"qonnx"'), "not supported by backend"),
])
def test_bad_target_key_or_value_is_named_with_a_suggestion(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        catalog.load_target(_write(tmp_path, text))
    assert needle in e.value.one_line()


@pytest.mark.parametrize("text,key", [
    ('backend = "onnxruntime"\nflavour = "qcdq"\nopset = "13"\n', "'opset'"),
    ('backend = "onnxruntime"\nflavour = "qcdq"\nweight_bits = 8\n', "'weight_bits'"),
    ('backend = "onnxruntime"\nflavour = "qcdq"\nweight_bits = [8, "4"]\n', "'weight_bits'"),
    ('backend = "onnxruntime"\nflavour = "qcdq"\n[quant]\nfirst_last_bits = true\n', "'first_last_bits'"),
    ('backend = "tensorrt"\nflavour = "qdq"\n[options]\nworkspace_mb = "1G"\n', "options.workspace_mb"),
])
def test_wrong_type_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        catalog.load_target(_write(tmp_path, text))
    assert key in e.value.one_line()


@pytest.mark.parametrize("text,needle", [
    ('backend = "onnxruntime"\n', "missing required key 'flavour'"),
    (GOOD_TARGET.replace("[4, 8]", "[1, 8]"), "2..8"),
    (_top("accelerated_act_bits = [4]"), "not in act_bits"),
    (GOOD_TARGET.replace("0.99", "1.5"), "min_top1_agreement"),
    (GOOD_TARGET + "[quant]\nfirst_last_bits = 6\n", "first_last_bits = 6"),
])
def test_inconsistent_target_is_rejected(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        catalog.load_target(_write(tmp_path, text))
    assert needle in e.value.one_line()


def test_first_last_bits_same_is_spelled_same_everywhere(tmp_path):
    t = catalog.load_target(_write(tmp_path, GOOD_TARGET + '[quant]\nfirst_last_bits = "same"\n'))
    assert t.quant.first_last_bits == "same"
    with pytest.raises(ConfigError, match="first_last_bits must be between 2 and 8 or 'same', got 0"):
        catalog.load_target(_write(tmp_path, GOOD_TARGET + "[quant]\nfirst_last_bits = 0\n"))


def test_invalid_toml(tmp_path):
    with pytest.raises(ConfigError) as e:
        catalog.load_target(_write(tmp_path, 'backend = "onnxruntime\n'))
    assert "invalid TOML" in e.value.one_line()


def test_missing_file():
    with pytest.raises(MissingFileError):
        catalog.load_profile("no/such/profile.toml")


def test_unknown_names_suggest():
    with pytest.raises(UnknownNameError) as e:
        catalog.load_target("tensorrt-int")
    assert "did you mean 'tensorrt-int8'" in e.value.one_line()
    with pytest.raises(UnknownNameError) as e:
        catalog.load_profile("rpi6")
    assert "did you mean 'rpi5'" in e.value.one_line()


@pytest.mark.parametrize("text,needle", [
    ('targets = ["tensorrt-int9"]\n', "did you mean 'tensorrt-int8'"),
    ('targets = []\n', "at least one target"),
    ('description = "x"\n', "missing required key 'targets'"),
    ('targets = ["cpu"]\n[hardware.cpu]\ncorse = 4\n', "did you mean 'cores'"),
    ('targets = ["cpu"]\n[hardware]\nmemory_gigs = 4\n', "did you mean 'memory_gb'"),
    ('targets = ["cpu"]\n[hardware.fpga]\nlut = "53K"\n', "'hardware.fpga.lut' must be int"),
    ('targets = ["cpu"]\n[hardware.accelerator]\nkind = "tpu"\n', "kind must be one of"),
    ('targets = ["cpu"]\n[bench]\nthreads = "4"\n', "'threads' must be int"),
    ('targets = ["cpu"]\n[bench]\nbatch_sizes = [0]\n', "batch_sizes"),
    ('targets = ["cpu"]\n[budgets]\nlatency_percentile = "p999"\n', "latency_percentile"),
    ('targets = ["cpu"]\n[budgets]\nmin_accuracy = 90\n', "min_accuracy"),
])
def test_bad_profile_is_rejected(tmp_path, text, needle):
    with pytest.raises(EdgekdError) as e:
        catalog.load_profile(_write(tmp_path, text))
    assert needle in e.value.one_line()


# --- pre-flight -----------------------------------------------------------------------------------------


def _levels(findings, level):
    return [f["code"] for f in findings if f["level"] == level]


def test_preflight_tensorrt_refuses_4_bit_activations():
    findings = catalog.preflight("jetson", 4, 4)
    assert _levels(findings, "error") == ["act_bits_not_accepted"]
    assert "weight_bits_not_accelerated" in _levels(findings, "warning")
    assert "signed_act_after_relu" in _levels(findings, "info")
    assert findings[0]["level"] == "error" and "--act-bits 8" in findings[0]["suggestion"]


def test_preflight_findings_have_the_documented_keys():
    for f in catalog.preflight("jetson", 4, 4):
        assert f["level"] in catalog.LEVELS and f["message"] and "suggestion" in f


def test_preflight_onnxruntime_accepts_but_does_not_accelerate_low_bits():
    findings = catalog.preflight("cpu", 4, 4)
    assert not _levels(findings, "error")
    assert set(_levels(findings, "warning")) == {"weight_bits_not_accelerated", "act_bits_not_accelerated"}
    assert "qonnx-finn" in findings[0]["suggestion"]


def test_preflight_fpga_accelerates_low_bits_and_po2_is_noted():
    assert not [f for f in catalog.preflight("fpga", 2, 2) if f["level"] != "info"]
    assert "po2_scales" in _levels(catalog.preflight("hls4ml", 4, 4), "info")


def test_preflight_out_of_range_and_require_deployable():
    assert _levels(catalog.preflight("cpu", 1, 16), "error") == ["weight_bits_out_of_range", "act_bits_out_of_range"]
    with pytest.raises(IncompatibleError) as e:
        catalog.require_deployable("jetson", 4, 4)
    assert "4-bit activations" in e.value.one_line()
    assert catalog.require_deployable("rpi", 8, 8) == []


# --- CLI ------------------------------------------------------------------------------------------------


def _run(*args):
    return CliRunner().invoke(main, list(args))


def _assert_one_line_error(result, needle):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and needle in err
    assert "Traceback" not in result.output


def test_cli_targets_list_and_json():
    result = _run("targets", "list")
    assert result.exit_code == 0 and all(n in result.stdout for n in TARGETS)
    rows = json.loads(_run("targets", "list", "--json").stdout)
    assert [r["name"] for r in rows] == TARGETS


def test_cli_targets_show_alias_profile_path_and_json(tmp_path):
    result = _run("targets", "show", "jetson")
    assert result.exit_code == 0 and "tensorrt-int8" in result.stdout and "act_after_relu" in result.stdout
    assert "preferred target of profile rpi5" in _run("targets", "show", "rpi5").stdout
    assert _run("targets", "show", _write(tmp_path, GOOD_TARGET, "x.toml")).exit_code == 0
    assert json.loads(_run("targets", "show", "cpu", "--json").stdout)["name"] == "onnxruntime-cpu"


def test_cli_profiles_list_show_and_json():
    result = _run("profiles", "list")
    assert result.exit_code == 0 and all(n in result.stdout for n in PROFILES)
    assert [r["name"] for r in json.loads(_run("profiles", "list", "--json").stdout)] == PROFILES
    result = _run("profiles", "show", "kv260")
    assert result.exit_code == 0 and "xck26-sfvc784-2LV-c" in result.stdout and "sources" in result.stdout
    assert json.loads(_run("profiles", "show", "pi5", "--json").stdout)["hardware"]["cpu"]["cores"] == 4


@pytest.mark.parametrize("args,needle", [
    (("targets", "show", "jetsn"), "did you mean 'jetson'"),
    (("profiles", "show", "rpi6"), "did you mean 'rpi5'"),
    (("targets", "show", "nowhere/x.toml"), "not found"),
    (("check", "--target", "tensorrt"), "did you mean"),
])
def test_cli_unknown_names_exit_2_on_one_line(args, needle):
    _assert_one_line_error(_run(*args), needle)


def test_cli_bad_user_file_exits_2_on_one_line(tmp_path):
    path = _write(tmp_path, GOOD_TARGET.replace("flavour", "flavor"))
    _assert_one_line_error(_run("targets", "show", path), "did you mean 'flavour'")


def test_cli_check():
    ok = _run("check", "--target", "rpi5")
    assert ok.exit_code == 0 and "ok: W8A8" in ok.stdout
    warn = _run("check", "--target", "cpu", "--bits", "4")
    assert warn.exit_code == 0 and "warning" in warn.stdout
    bad = _run("check", "--target", "jetson", "--weight-bits", "8", "--act-bits", "4")
    assert bad.exit_code == 2 and "does not accept 4-bit activations" in bad.stdout
    assert bad.stderr.strip().startswith("error: W8A4 cannot be deployed to tensorrt-int8")
    data = json.loads(_run("check", "--target", "fpga", "--bits", "2", "--student", "cnn-student", "--json").stdout)
    assert data["ok"] and data["target"] == "qonnx-finn" and data["student"] == "cnn-student"
