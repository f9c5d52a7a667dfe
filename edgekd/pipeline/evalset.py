"""What export evaluates on: the run's test split read again, a bounded sample of it for the bundle,
and the whole split through the runtime.

A bundle's ``eval.npz`` holds a fixed, seeded, stratified sample of the test split (at most
``eval_samples`` images, 2,000 by default): parity with PyTorch and bench's on-device accuracy use
it, so a bundle stays small whatever the dataset (10,000 RGB images of 224x224 would be 6 GB).
The whole test split still goes through the runtime once, at export, in chunks (never all in
memory for a lazy split): the manifest records ``runtime_accuracy_full``, ``torch_accuracy_full``
and ``test_samples`` next to the sample's ``runtime_accuracy`` and ``torch_accuracy``.
"""

from __future__ import annotations

import numpy as np

from ..core.errors import EdgekdError

DEFAULT_EVAL_SAMPLES = 2000
CHUNK = 1000  # test images per runtime call when the whole split is measured


def eval_sample(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded, stratified sample of at most ``n`` of the labels ``y``: every class
    keeps its share (rounded by largest remainder, so the sizes add up to ``n``); all of ``y`` when
    it holds at most ``n``."""
    y = np.asarray(y)
    if n >= len(y):
        return np.arange(len(y))
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * n / len(y)
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take), kind="stable")[: n - int(take.sum())]:
        take[i] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def read_test_split(meta: dict, torch_data=None):
    """The run's dataset, read as training read it (its recorded data options and normalization)."""
    from ..data import load_dataset
    from ..data.options import DataOptions
    from ..data.torchdata import PYTHON_API

    if meta["dataset"] == PYTHON_API or torch_data is not None:
        if torch_data is None:
            raise EdgekdError("the run's data came from the Python API (python-api), which export cannot read again",
                              "call api.export(..., data=api.TorchData(...)) with the same datasets")
        return _same_classes(torch_data.dataset(meta["seed"]), meta)
    options = DataOptions.from_record(meta.get("data_options"), workers=DataOptions().workers)
    norm = meta["normalization"]
    if meta["dataset"].startswith("imagefolder:") and options.normalize == "auto":
        # the statistics were computed once, at training time, on decoded images: reuse them
        options.normalize = "/".join(",".join(repr(float(v)) for v in norm[k]) for k in ("mean", "std"))
    data = load_dataset(meta["dataset"], seed=meta["seed"], options=options)
    if [data.mean, data.std] != [norm["mean"], norm["std"]]:
        raise EdgekdError(f"the dataset {meta['dataset']} no longer matches the run's normalization",
                          "export on the machine and data the student was distilled with")
    return _same_classes(data, meta)


def _same_classes(data, meta: dict):
    """``data`` when its classes and input shape are the run's (so every test label is one of the
    model's outputs, and the samples are the size it was trained on: a model with adaptive pooling
    would take other sizes and give an accuracy that means nothing)."""
    if list(data.classes) != list(meta["classes"]):
        raise EdgekdError(f"the classes of {meta['dataset']} are not the run's any more ({len(data.classes)} now, "
                          f"{len(meta['classes'])} in the run)", "export with the data the student was distilled with")
    shape, trained = list(data.input_shape), list(meta.get("input_shape") or data.input_shape)
    if shape != trained:
        raise EdgekdError(f"the images of {meta['dataset']} are {'x'.join(map(str, shape))} now, the run was trained "
                          f"on {'x'.join(map(str, trained))}", "export with the data the student was distilled with")
    return data


def eval_arrays(data, eval_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the bundle's eval sample of ``data``'s test split."""
    idx = eval_sample(data.test.y, eval_samples, seed)
    if hasattr(data.test, "prepare"):  # an image folder: decode the test split once, into its cache
        data.test.prepare()
    return np.ascontiguousarray(data.test.take(idx), dtype=np.float32), np.asarray(data.test.y[idx], dtype=np.int64)


def full_accuracy(model, backend, artifact, options: dict, split, sample: dict, log=lambda s: None) -> dict:
    """Top-1 accuracy of the PyTorch model and of the runtime on the whole test split, in chunks of
    CHUNK images; when the sample (``sample``: its parity report) is the whole split, its numbers.
    Returns the manifest's fields (``eval_samples``, ``test_samples``, ``*_accuracy_full``)."""
    import torch

    total, n = len(split), sample["n"]
    if hasattr(split, "prepare"):
        split.prepare()
    if n >= total:
        return {"eval_samples": n, "test_samples": total, "torch_accuracy_full": sample["torch_accuracy"],
                "runtime_accuracy_full": sample["runtime_accuracy"], "top1_agreement_full": sample["top1_agreement"]}
    torch_hits = runtime_hits = agree = 0
    for lo in range(0, total, CHUNK):
        idx = np.arange(lo, min(lo + CHUNK, total))
        x, y = np.ascontiguousarray(split.take(idx), dtype=np.float32), np.asarray(split.y[idx])
        with torch.no_grad():
            reference = torch.cat([model(torch.from_numpy(x[i: i + 500])) for i in range(0, len(x), 500)]).numpy()
        runtime = np.asarray(backend.infer(artifact, x, options)).argmax(1)
        torch_hits += int((reference.argmax(1) == y).sum())
        runtime_hits += int((runtime == y).sum())
        agree += int((runtime == reference.argmax(1)).sum())
    log(f"whole test split ({total} images): runtime accuracy {runtime_hits / total:.4f}, PyTorch "
        f"{torch_hits / total:.4f}, top-1 agreement {agree / total:.4f}; eval.npz keeps a stratified sample of {n}")
    return {"eval_samples": n, "test_samples": total, "torch_accuracy_full": torch_hits / total,
            "runtime_accuracy_full": runtime_hits / total, "top1_agreement_full": agree / total}
