"""Shared fixtures: tiny real data and a tiny distilled run, built once per session."""

from __future__ import annotations

import os
import warnings

import pytest

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def digits():
    from edgekd.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A W4A4 student distilled on digits for 2 epochs, with a 2-epoch teacher (about 15 s)."""
    from edgekd import api

    root = tmp_path_factory.mktemp("tiny")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        opts = api.DistillOptions(weight_bits=4, act_bits=4, epochs=2, float_epochs=1, teacher_epochs=2,
                                  batch_size=64, progress=False)
        metrics = api.distill(opts, out=root / "run")
    finally:
        os.chdir(cwd)
    return root / "run", metrics


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny real run and its bundle (test_safety_paths.TINY, made under umask 022), once per module."""
    from types import SimpleNamespace

    from edgekd import api
    from tests.test_safety_paths import TINY, chdir, umask

    root = tmp_path_factory.mktemp("trained")
    with umask(0o022), chdir(root):
        api.distill(api.DistillOptions(**TINY), out=root / "run")
        api.export(root / "run", "onnxruntime-cpu", out=root / "bundle")
    return SimpleNamespace(root=root, run=root / "run", bundle=root / "bundle")


@pytest.fixture(autouse=True, scope="session")
def _image_cache_in_a_temporary_folder(tmp_path_factory):
    """Decoded-image caches (data.decoded) go to a folder of this session, not the user's ~/.cache."""
    old = os.environ.get("EDGEKD_CACHE_DIR")
    os.environ["EDGEKD_CACHE_DIR"] = str(tmp_path_factory.mktemp("edgekd-cache"))
    yield
    if old is None:
        os.environ.pop("EDGEKD_CACHE_DIR", None)
    else:
        os.environ["EDGEKD_CACHE_DIR"] = old
