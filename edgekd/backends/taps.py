"""Running an exported graph with extra outputs (``Backend.run_tapped``), per runtime: the layer
outputs ``edgekd explain`` compares with PyTorch's (taps: export.probe)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def with_outputs(model, names: list[str]):
    """A copy of ``model`` (ModelProto) whose graph also outputs the tensors ``names`` (types from
    shape inference)."""
    import onnx
    from onnx import helper, shape_inference

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    known = {v.name: v for v in shape_inference.infer_shapes(copy).graph.value_info}
    existing = {o.name for o in copy.graph.output}
    for name in names:
        if name not in existing:
            copy.graph.output.append(known[name] if name in known else helper.make_empty_tensor_value_info(name))
    return copy


def onnxruntime_tapped(model, tapped: dict, x: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """``OnnxRuntimeBackend.run_tapped``: ``model`` (ModelProto) run on ``x`` at full optimization (the
    int8 fusions a device applies), one thread, ``batch`` samples per call, every tap made an extra
    output of an in-memory copy; the real value of every tap (``export.probe.Tap``), by name."""
    from ..export.probe import real_values
    from .onnxruntime import _options, _ort

    names = sorted({t.tensor for t in tapped.values()})
    sess = _ort().InferenceSession(with_outputs(model, names).SerializeToString(), _options(1, "all"),
                                   providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0].name
    parts: dict[str, list] = {n: [] for n in names}
    for i in range(0, len(x), batch):
        for n, v in zip(names, sess.run(names, {feed: x[i: i + batch]})):
            parts[n].append(v)
    raw = {n: np.concatenate(v) for n, v in parts.items()}
    return {layer: real_values(model, t, raw[t.tensor]) for layer, t in tapped.items()}


def qonnx_tapped(model_path: Path, tapped: dict, x: np.ndarray, batch: int | None = None) -> dict[str, np.ndarray]:
    """``QonnxBackend.run_tapped``: the QONNX graph at ``model_path`` run on ``x`` by qonnx's executor
    (every tensor kept); the value of every tap (``export.probe.Tap``), by name (a Quant node's output
    is real-valued already)."""
    from .qonnx import EXEC_BATCH, _require, padded_chunks, with_batch

    _require()
    batch = EXEC_BATCH if batch is None else batch
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    batch = max(1, min(batch, len(x)))
    batched = with_batch(ModelWrapper(str(model_path)), batch)
    iname = batched.graph.input[0].name
    parts: dict[str, list] = {k: [] for k in tapped}
    for chunk, n in padded_chunks(x, batch, batch):
        context = execute_onnx(batched, {iname: np.ascontiguousarray(chunk, dtype=np.float32)},
                               return_full_exec_context=True)
        for k, t in tapped.items():
            parts[k].append(np.asarray(context[t.tensor], np.float64)[:n])
    return {k: np.concatenate(v) for k, v in parts.items()}
