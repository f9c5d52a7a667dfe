"""Multi-process (torchrun) and GPU paths, checked on the CPU with stand-ins: gloo ranks in spawned
processes or under torchrun, the ``meta`` device for a model on another device than its inputs, and
monkeypatched CUDA functions where no GPU exists (issue #21)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from edgekd.core.errors import ConfigError
from edgekd.training import checkpoint as ck
from edgekd.training import distributed as dd

ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cwd: Path, *args, torchrun: bool = False, script: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m edgekd ARGS``, or the same under torchrun with 2 CPU processes (gloo); ``script``
    replaces ``-m edgekd`` (a driver that patches something, then runs the CLI)."""
    entry = [str(script)] if script else ["-m", "edgekd"]
    launch = [sys.executable]
    if torchrun:
        launch += ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}"]
    return subprocess.run([*launch, *entry, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=ENV,
                          timeout=600)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[Path, Path]:
    """A one-epoch cnnfc-student teacher on digits (a few seconds)."""
    root = tmp_path_factory.mktemp("ddp")
    result = _run(root, "train", "--arch", "cnnfc-student", "--epochs", "1", "--out", "teacher", "-q")
    assert result.returncode == 0, result.stderr[-2000:]
    return root, root / "teacher" / "model.pt"


def _spawn(fn, tmp_path: Path, *args) -> list:
    """Run ``fn(*args)`` on 2 gloo ranks in spawned processes; each rank's return value (tensors,
    saved with torch.save and read back with weights_only=True), in rank order."""
    torch.multiprocessing.spawn(_rank_main, args=(fn, str(tmp_path), args), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _rank_main(rank: int, fn, root: str, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2)
    try:
        torch.save(fn(*args), Path(root) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _small_teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()


def _images(n: int = 37) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).normal(size=(n, 1, 8, 8)).astype(np.float32))


# --- 1. collectives run on the device the backend needs --------------------------------------------

def test_comm_device_is_the_gpu_for_nccl_and_the_cpu_for_gloo(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert dd.comm_device("nccl") == torch.device("cuda", 3)
    assert dd.comm_device("gloo") == torch.device("cpu")


def test_gather_and_sum_hand_the_collective_tensors_on_its_device(monkeypatch):
    """Under nccl (here: a stand-in device, ``meta``) the teacher cache's CPU rows go to the collective's
    device before the gather, and the counts of all_sum too."""
    class Reached(Exception):
        pass

    seen = []

    def fake_collective(*tensors, **_):
        for t in tensors:
            seen.extend(x.device.type for x in (t if isinstance(t, list) else [t]))
        raise Reached

    monkeypatch.setattr(dd, "world", lambda: 2)
    monkeypatch.setattr(dd, "rank", lambda: 0)
    monkeypatch.setattr(dd, "comm_device", lambda backend=None: torch.device("meta"))
    monkeypatch.setattr(dist, "all_gather", fake_collective)
    monkeypatch.setattr(dist, "all_reduce", fake_collective)
    with pytest.raises(Reached):
        dd.gather_rows(torch.ones(3, 2, dtype=torch.float16), 5)
    with pytest.raises(Reached):
        dd.all_sum(1.0, 2.0)
    assert seen and set(seen) == {"meta"}


def _cache_rows(x, layers):
    from edgekd.training.cache import build_teacher_cache

    cache = build_teacher_cache(_small_teacher(), x, layers, batch_size=8, flips=True)
    gathered = dd.gather_rows(torch.arange(6, dtype=torch.uint8).view(3, 2) + dd.rank(), 6)  # CUDA RNG states: bytes
    return {"logits": cache.logits, "feat": cache.feats["1"], "flipped": cache.flipped.logits, "bytes": gathered,
            "device": str(cache.logits.device)}


def test_teacher_cache_built_in_shards_on_two_gloo_ranks_equals_one_process(tmp_path):
    x = _images(37)  # not a multiple of the world size: the last rank holds fewer rows
    one = _cache_rows(x, ("1",))
    ranks = _spawn(_cache_rows, tmp_path, x, ("1",))
    for got in ranks:
        assert got["device"] == "cpu"
        for key in ("logits", "feat", "flipped"):
            assert torch.equal(got[key], one[key]), key
        assert got["bytes"].tolist() == [[0, 1], [2, 3], [4, 5], [1, 2], [3, 4], [5, 6]]


# --- 2. SyncBatchNorm while a phase runs, the model's own BatchNorms after ------------------------

def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 6),
                         nn.BatchNorm1d(6))


def test_synced_batchnorm_puts_the_original_batchnorms_back_with_the_trained_state():
    model = _bn_model()
    before = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dd.synced_batchnorm(model):
        synced = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
        assert len(synced) == 2
        model.train()
        model(torch.randn(8, 1, 8, 8)).sum().backward()  # no process group: a local batch norm
        opt.step()
        model.eval()
    after = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert [type(m) for m in after] == [nn.BatchNorm2d, nn.BatchNorm1d] and all(a is b for a, b in zip(after, before))
    assert list(model.state_dict()) == keys
    for bn, sync in zip(after, synced):
        assert torch.equal(bn.running_mean, sync.running_mean) and bn.num_batches_tracked.item() == 1
        assert bn.weight is sync.weight and not bn.training  # the optimizer's parameters, the last mode
        assert float(bn.running_var.sub(1).abs().max()) > 0  # statistics trained inside the block
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in model.parameters()} == trained


def test_synced_batchnorm_restores_on_an_error():
    model = _bn_model()
    with pytest.raises(KeyError):
        with dd.synced_batchnorm(model):
            raise KeyError("stop")
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


_SYNCBN_DRIVER = '''
import os, sys
from pathlib import Path
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from edgekd.training import distributed as dd

dd.sync_batchnorm = lambda device: True  # as on CUDA

def forward(self, x):  # SyncBatchNorm runs on GPUs only: on the CPU each rank normalises its shard
    Path(os.environ["SYNCBN_MARK"]).touch()
    return _BatchNorm.forward(self, x)

torch.nn.SyncBatchNorm.forward = forward
torch.nn.parallel.DistributedDataParallel._passing_sync_batchnorm_handle = lambda self, module: None  # "GPU only"
from edgekd.cli import main
sys.argv[0] = "edgekd"
main()
'''


def test_torchrun_run_with_sync_batchnorm_exports_with_parity(teacher):
    """torchrun, 2 gloo ranks, batch norms synced as on CUDA: the saved student is the model's own
    architecture again, so export rebuilds and loads it, and the runtime agrees with PyTorch."""
    root, model = teacher
    driver = root / "syncbn_driver.py"
    driver.write_text(_SYNCBN_DRIVER)
    mark = root / "syncbn-ran"
    ENV["SYNCBN_MARK"] = str(mark)
    try:
        result = _run(root, "distill", "--teacher", model, "--float-epochs", "1", "--epochs", "1", "-q",
                      "--out", "syncbn", torchrun=True, script=driver)
    finally:
        ENV.pop("SYNCBN_MARK")
    assert result.returncode == 0, result.stderr[-3000:]
    assert mark.exists()  # the phases ran with SyncBatchNorm
    exported = _run(root, "export", "syncbn", "--out", "syncbn-bundle", "-q")
    assert exported.returncode == 0, exported.stderr[-3000:]
    manifest = json.loads((root / "syncbn-bundle" / "manifest.json").read_text())
    assert manifest["parity"]["top1_agreement"] >= 0.99 and manifest["parity"]["max_abs_diff"] < 0.05
    float_keys = torch.load(root / "syncbn" / "float.pt", weights_only=True)["state_dict"].keys()
    assert float_keys == torch.load(model, weights_only=True)["state_dict"].keys()  # the same architecture


# --- 3. the layer probe runs its batch where each model is ---------------------------------------

def test_probe_moves_its_batch_to_the_teachers_device():
    """A teacher on another device than the (CPU) probe batch: ``meta`` stands in for a GPU."""
    from edgekd.kd.features import Probe, layer_table
    from edgekd.training.cache import cache_off_reason

    x = _images(4)
    student, gpu_teacher = _small_teacher(), _small_teacher().to("meta")
    probe = Probe(student, gpu_teacher, x)
    assert probe.teacher_shape("0") == (4, 8, 8) and probe.student_shape("0") == (4, 8, 8)
    assert [r["name"] for r in layer_table(gpu_teacher, x)][-1] == "logits"
    assert cache_off_reason(False, gpu_teacher, ("0",), x) is None


# --- 4. a stage that leaves parameters unused under DDP (fsp) -----------------------------------

def test_fsp_first_stage_trains_under_torchrun(teacher):
    """fsp's first stage trains without the classifier; DDP used to stop at the second step because the
    classifier's parameters got no gradient."""
    root, model = teacher
    result = _run(root, "distill", "--teacher", model, "--method", "fsp", "--float-epochs", "1", "--epochs", "1",
                  "-q", "--out", "fsp", torchrun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "did not receive grad" not in result.stderr and "find_unused_parameters" not in result.stderr
    metrics = json.loads((root / "fsp" / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert {r["phase"] for r in metrics["history"]} >= {"first stage", "float", "qat"}


# --- 5. one GPU per process under torchrun ---------------------------------------------------------

@pytest.mark.parametrize("given", ["cuda", "cuda:0"])
def test_torchrun_puts_each_process_on_the_gpu_of_its_local_rank(monkeypatch, given):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert dd.resolve_device(given) == torch.device("cuda", 2)
    assert dd.resolve_device("cpu") == torch.device("cpu")


def test_a_single_process_keeps_the_device_it_was_given(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dd.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert dd.resolve_device("cuda") == torch.device("cuda")


def test_torchrun_refuses_a_fixed_gpu_index(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="--device cuda:1 under torchrun") as e:
        dd.resolve_device("cuda:1")
    assert "CUDA_VISIBLE_DEVICES" in e.value.one_line()
    with pytest.raises(ConfigError, match="unknown device 'cuda:x'"):
        dd.resolve_device("cuda:x")


def test_more_processes_than_gpus_is_refused_before_joining(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="LOCAL_RANK 3, but this node has 2 visible GPU") as e:
        dd.init_from_env("cuda")
    assert "--nproc-per-node" in e.value.one_line() and not dist.is_initialized()


def test_distill_under_torchrun_with_a_fixed_gpu_index_is_one_error_line(monkeypatch, tmp_path):
    """The check runs before the process group is joined and before anything is written."""
    from click.testing import CliRunner

    from edgekd.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for key, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(main, ["distill", "--device", "cuda:1", "--epochs", "1", "--out", "run", "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "--device cuda:1 under torchrun" in lines[0] and "--device cuda" in lines[0]
    assert not dist.is_initialized() and list(tmp_path.iterdir()) == []


# --- 6. the CUDA RNG states in training checkpoints -------------------------------------------------

class _FakeCuda:
    """torch.cuda's RNG functions on a machine with ``n`` GPUs (none is needed)."""

    def __init__(self, monkeypatch, n: int):
        self.states = [torch.full((16,), i + 1, dtype=torch.uint8) for i in range(n)]
        self.set: list[tuple[int, int]] = []
        monkeypatch.setattr(ck, "_cuda", lambda: True)  # torch.cuda.is_available() for the checkpoint alone
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": self.set.append((int(s[0]), device)))


def test_rng_state_keeps_every_gpus_cuda_rng_and_restores_it(monkeypatch, tmp_path):
    cuda = _FakeCuda(monkeypatch, 2)
    gen = torch.Generator().manual_seed(5)
    state = ck.rng_state(gen)
    assert [int(s[0]) for s in state["cuda"]] == [1, 2]
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)  # tensors and plain values only
    draws = (torch.rand(3), gen.get_state(), random.random(), np.random.rand())
    ck.restore_rng(loaded, gen)
    assert cuda.set == [(1, 0), (2, 1)]
    again = (torch.rand(3), gen.get_state(), random.random(), np.random.rand())
    assert torch.equal(draws[0], again[0]) and torch.equal(draws[1], again[1]) and draws[2:] == again[2:]


def test_restore_rng_skips_gpus_this_machine_lacks_and_old_checkpoints(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    saved = dict(ck.rng_state(gen), cuda=[torch.full((16,), 7, dtype=torch.uint8)] * 3)
    cuda = _FakeCuda(monkeypatch, 1)
    ck.restore_rng(saved, gen)
    assert cuda.set == [(7, 0)]
    cuda.set.clear()
    ck.restore_rng({"torch": torch.get_rng_state(), "gen": gen.get_state()}, gen)  # a checkpoint from before
    assert cuda.set == []


def test_phase_checkpoint_carries_the_cuda_rng_and_resume_restores_it(monkeypatch, tmp_path):
    """The loop's checkpoint (training.loop.Phase.save) holds the CUDA states; resuming sets them."""
    from edgekd import training as tr
    from edgekd.data import Dataset, Split

    rng = np.random.default_rng(0)
    split = Split(rng.normal(size=(32, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, 32).astype(np.int64))
    data = Dataset("tiny", split, split, split, ["a", "b", "c"], [0.0], [1.0])
    cuda = _FakeCuda(monkeypatch, 2)
    cfg = tr.FitConfig(epochs=1, batch_size=16, progress=False)
    phase = ck.PhaseCheckpoint(tmp_path / "phase-01.pt", "float")
    ce = lambda s, t, y: (torch.nn.functional.cross_entropy(s, y), {})  # noqa: E731
    tr.fit(_small_teacher().train(), data, cfg, ce, checkpoint=phase)
    saved = torch.load(phase.path, weights_only=True)
    assert [int(s[0]) for s in saved["rng"]["cuda"]] == [1, 2] and "python" in saved["rng"]
    assert cuda.set == []
    tr.fit(_small_teacher().train(), data, cfg, ce, checkpoint=phase)  # a finished phase: restored
    assert cuda.set == [(1, 0), (2, 1)]
