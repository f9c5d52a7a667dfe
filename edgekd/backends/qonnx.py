"""The QONNX backend (FPGA): run a QONNX graph with qonnx's executor, check it against the
input rules of FINN and hls4ml, and estimate what it costs on an FPGA.

Nothing here runs on an FPGA. ``run`` is qonnx's reference execution (node by node, each
standard node through ONNX Runtime, each ``Quant`` node through qonnx's numpy implementation):
the arithmetic FINN/hls4ml must reproduce. ``estimate`` is a back-of-the-envelope resource and
speed estimate, always labelled ``source: "estimated"``; it is no synthesis report.

Needs the ``qonnx`` package (``pip install 'edgekd[qonnx]'``), imported inside the functions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import EdgekdError, MissingExtraError
from . import Backend, Compiled, ExportContext, Option, host_facts, padded_chunks

EXEC_BATCH = 500  # samples per execute_onnx call (the executor needs a fixed batch in the graph)
BRAM_36K_BITS = 36 * 1024
URAM_BITS = 288 * 1024
FINN_CLOCK_MHZ = 100.0  # FINN's default synth_clk_period_ns = 10
LUT_SHARE = 0.5  # share of the LUTs the estimate lets MAC lanes use (the rest: control, FIFOs, DMA)

# Standard ops FINN's QONNX ingestion + streamlining handles for CNNs/MLPs (FINN docs, "ONNX
# import" / "Streamlining"; ConvertQONNXtoFINN turns Quant nodes into MultiThreshold + weights).
FINN_OPS = frozenset({"Quant", "BipolarQuant", "Conv", "MatMul", "Gemm", "Relu", "Add", "Mul", "Sub", "Div",
                      "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Transpose",
                      "BatchNormalization", "Concat", "Identity", "Pad", "Trunc"})
# Ops hls4ml's ONNX/QONNX frontend converts (hls4ml docs, "ONNX and QONNX" frontend).
HLS4ML_OPS = frozenset({"Quant", "Conv", "MatMul", "Gemm", "Relu", "Add", "Mul", "Sub", "Div", "MaxPool",
                        "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Transpose",
                        "BatchNormalization", "Concat", "Identity", "Softmax", "Sigmoid", "Tanh", "Clip"})


def _require():
    try:
        from qonnx.core.modelwrapper import ModelWrapper  # noqa: F401
    except ImportError:
        raise MissingExtraError("qonnx", "qonnx", "the FPGA (QONNX) backend") from None


# --- execution --------------------------------------------------------------------------------

def with_batch(model, batch: int):
    """A copy of the ModelWrapper ``model`` whose batch dimension is ``batch`` (qonnx's executor
    checks every tensor shape, so the batch must be fixed in the graph): the first dimension of
    the input is set, constant Reshape targets that pin the batch to 1 become -1, and shapes are
    inferred again. The bundle's file keeps batch 1, which is what FINN expects."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_shapes import InferShapes

    copy = ModelWrapper(model.model.__deepcopy__())
    graph = copy.graph
    graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    for vi in list(graph.value_info) + list(graph.output):
        vi.type.tensor_type.ClearField("shape")
    del graph.value_info[:]
    for node in graph.node:
        if node.op_type == "Reshape":
            target = copy.get_initializer(node.input[1])
            if target is not None and target.size and target[0] == 1:
                fixed = target.copy()
                fixed[0] = -1
                copy.set_initializer(node.input[1], fixed.astype(target.dtype))
    return copy.transform(InferShapes())


def run(model_path: Path, x: np.ndarray, batch: int = EXEC_BATCH) -> np.ndarray:
    """Logits of the QONNX graph at ``model_path`` for all of ``x`` through qonnx's executor,
    ``batch`` samples per call (the last chunk is padded by repeating samples, then cut)."""
    _require()
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    model = ModelWrapper(str(model_path))
    batch = max(1, min(batch, len(x)))
    batched = with_batch(model, batch)
    iname, oname = batched.graph.input[0].name, batched.graph.output[0].name
    out = []
    for chunk, n in padded_chunks(x, batch, batch):
        out.append(np.asarray(execute_onnx(batched, {iname: np.ascontiguousarray(chunk, dtype=np.float32)})[oname])[:n])
    return np.concatenate(out)


# --- toolflow input rules ------------------------------------------------------------------------

def _quant_nodes(model):
    """(node, scale, zero point, bits, signed, producer op) of every Quant node."""
    for node in model.graph.node:
        if node.op_type != "Quant":
            continue
        attrs = {a.name: a for a in node.attribute}
        signed = bool(attrs["signed"].i) if "signed" in attrs else True
        scale, zeropt, bits = (model.get_initializer(node.input[k]) for k in (1, 2, 3))
        producer = model.find_producer(node.input[0])
        is_weight = model.get_initializer(node.input[0]) is not None
        consumers = model.find_consumers(node.output[0]) or []
        is_bias = is_weight and any(c.op_type in ("Conv", "Gemm") and list(c.input).index(node.output[0]) == 2
                                    or c.op_type == "Add" for c in consumers)
        yield {"node": node.name, "scale": scale, "zeropt": zeropt, "bits": bits, "signed": signed,
               "after": producer.op_type if producer is not None else "input", "weight": is_weight,
               "bias": is_bias,
               "rounding": attrs["rounding_mode"].s.decode() if "rounding_mode" in attrs else "ROUND"}


def check_rules(model_path: Path, toolflow: str) -> list[dict]:
    """Findings ``{"level": "error"|"warning", "rule", "message"}`` of the QONNX file against the
    input conventions of ``toolflow`` (``finn`` or ``hls4ml``). An empty list: nothing found.

    Both: every op in the toolflow's supported list; Quant zero point 0; integer bit widths
    2..8 (8 for the image input / logits); activations after ReLU unsigned (FINN's MultiThreshold
    and hls4ml's ap_ufixed). hls4ml also: power-of-two scales, one scale per tensor."""
    _require()
    from qonnx.core.modelwrapper import ModelWrapper

    if toolflow not in ("finn", "hls4ml"):
        raise EdgekdError(f"unknown FPGA toolflow {toolflow!r}", "choose finn or hls4ml")
    model = ModelWrapper(str(model_path))
    supported = FINN_OPS if toolflow == "finn" else HLS4ML_OPS
    findings = [{"level": "error", "rule": "supported_ops", "message": f"{toolflow} does not take {op} nodes"}
                for op in sorted({n.op_type for n in model.graph.node} - supported)]
    for q in _quant_nodes(model):
        findings += _quant_findings(q, toolflow)
    return findings


def _quant_findings(q: dict, toolflow: str) -> list[dict]:
    out = []
    role = "bias" if q["bias"] else "weights" if q["weight"] else "activations after " + q["after"]
    where = f"Quant {q['node']} ({role})"

    def add(level, rule, message):
        out.append({"level": level, "rule": rule, "message": f"{where}: {message}"})

    if q["zeropt"] is None or np.any(q["zeropt"] != 0):
        add("error", "zero_point", "zero point must be 0")
    bits = q["bits"]
    top = 32 if q["bias"] else 8  # an int32 bias (scale = input * weight scale) is exact in fixed point
    if bits is None or bits.size != 1 or float(bits) != int(bits) or not 1 <= int(bits) <= top:
        add("error", "bits", f"bit width must be one integer in 1..{top}, got {None if bits is None else bits.tolist()}")
    if not q["weight"] and q["after"] == "Relu" and q["signed"]:
        add("warning", "unsigned_after_relu", "signed quantizer after ReLU wastes half the codes "
            "(distill with act_after_relu = 'unsigned')")
    if q["rounding"] != "ROUND":
        add("warning", "rounding", f"rounding mode {q['rounding']} (FINN/hls4ml assume ROUND)")
    scale = q["scale"]
    if toolflow == "hls4ml" and scale is not None:
        if scale.size != 1:
            add("error", "per_tensor", f"{scale.size} scales; hls4ml maps one ap_fixed type per tensor")
        log2 = np.log2(np.abs(scale.astype(np.float64)))
        if not np.all(np.isfinite(log2)) or not np.allclose(log2, np.round(log2), atol=1e-6):
            add("error", "po2_scale", "scales are not powers of two (not exact in ap_fixed)")
    return out


# --- resource estimate ---------------------------------------------------------------------------

def inference_cost(model_path: Path) -> dict:
    """qonnx.util.inference_cost totals: MACs and bit operations (weight bits x activation bits per
    MAC), weight memory in bits and elements, output activation memory."""
    _require()
    import warnings

    from qonnx.util.inference_cost import inference_cost as qcost

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cost = qcost(str(model_path), discount_sparsity=False, cost_breakdown=True)
    total = cost["total_cost"]
    return {"macs": float(total.get("total_macs", 0)), "bops": float(total.get("total_bops", 0)),
            "weight_bits": float(total.get("total_mem_w_bits", 0)),
            "weight_elems": float(total.get("total_mem_w_elems", 0)),
            "activation_bits": float(total.get("total_mem_o_bits", 0)),
            "by_op": {k: {"macs": v.get("total_macs", 0), "bops": v.get("total_bops", 0),
                          "weight_bits": v.get("total_mem_w_bits", 0)}
                      for k, v in cost.get("optype_cost", {}).items()}}


def _mac_lane_cost(weight_bits: int, act_bits: int) -> tuple[str, float]:
    """Where one multiply-accumulate lane goes and what it costs: narrow products in LUTs, after
    the multiplier term of FINN's MVAU LUT estimate ((2*ceil((P+Q)/6)-1)*(P+Q)) plus a 16..32-bit
    accumulator; products with both operands wider than 4 bits in one DSP slice each."""
    if weight_bits > 4 and act_bits > 4:
        return "dsp", 1.0
    p_q = weight_bits + act_bits
    accumulator = min(32, p_q + 10)
    return "lut", (2 * math.ceil(p_q / 6) - 1) * p_q + accumulator


def estimate(cost: dict, fpga: dict, weight_bits: int, act_bits: int, clock_mhz: float = FINN_CLOCK_MHZ,
             lut_share: float = LUT_SHARE) -> dict:
    """Resource and speed estimate of a fully on-chip dataflow accelerator (FINN style) for the
    ``cost`` of ``inference_cost`` on a device with ``fpga`` facts (profile [hardware.fpga]).

    - weights on chip: ``bram_36k`` = ceil(weight bits / 36 Kb), a lower bound (real BRAM use is
      higher: memories are cut by width and depth). ``fits_on_chip`` compares with BRAM + URAM.
    - MAC lanes: as many as ``lut_share`` of the LUTs (narrow products) or all DSPs (wide ones)
      allow, at the cost of ``_mac_lane_cost``; layers folded so that all lanes stay busy.
    - ``cycles_per_inference`` = MACs / lanes; ``latency_ms`` = cycles / clock (a lower bound for
      one image: pipeline fill and FIFOs come on top); ``throughput_ips`` = clock / cycles.
    Every number is a model of the hardware, not a measurement; ``source`` says so."""
    kind, per_lane = _mac_lane_cost(weight_bits, act_bits)
    budget = (fpga.get("dsp") or 0) if kind == "dsp" else (fpga.get("lut") or 0) * lut_share
    lanes = max(1, int(budget // per_lane)) if budget else None
    macs = cost["macs"]
    lanes = min(lanes, int(macs)) if lanes and macs else lanes
    cycles = math.ceil(macs / lanes) if lanes and macs else None
    bram = math.ceil(cost["weight_bits"] / BRAM_36K_BITS)
    on_chip_bits = (fpga.get("bram_36k") or 0) * BRAM_36K_BITS + (fpga.get("uram") or 0) * URAM_BITS
    result = {
        "source": "estimated", "method": "edgekd dataflow heuristic (not a synthesis report)",
        "clock_mhz": clock_mhz, "mac_lane": kind, "luts_per_lane": per_lane if kind == "lut" else None,
        "mac_lanes": lanes, "macs": macs, "bops": cost["bops"], "weight_bits": cost["weight_bits"],
        "weight_kib": cost["weight_bits"] / 8 / 1024, "bram_36k": bram, "bram_36k_available": fpga.get("bram_36k"),
        "bram_fraction": bram / fpga["bram_36k"] if fpga.get("bram_36k") else None,
        "fits_on_chip": cost["weight_bits"] <= on_chip_bits if on_chip_bits else None,
        "cycles_per_inference": cycles,
        "latency_ms": cycles / (clock_mhz * 1e3) if cycles else None,
        "throughput_ips": clock_mhz * 1e6 / cycles if cycles else None,
        "device": {k: fpga.get(k) for k in ("part", "lut", "dsp", "bram_36k", "uram")},
    }
    return result


# --- optional: hls4ml C++ emulation ------------------------------------------------------------------

def hls4ml_available() -> bool:
    try:
        import hls4ml  # noqa: F401
    except Exception:  # ImportError, or a broken optional dependency
        return False
    return True


def hls4ml_emulate(model_path: Path, x: np.ndarray, out_dir: Path, backend: str = "Vitis",
                   default_precision: str = "fixed<16,6>") -> np.ndarray:
    """Convert the QONNX file with hls4ml (its documented QONNX flow: cleanup, channels-last,
    Gemm -> MatMul, cleanup) and run ``x`` (NCHW) through hls4ml's C++ emulation (``compile``
    builds it with g++; no HLS tools are needed). Layers whose types the Quant nodes fix are
    meant to be bit-exact; others use ``default_precision``. Needs ``pip install 'edgekd[hls4ml]'``.

    EXPERIMENTAL, not used by export: with hls4ml 1.3.0 and edgekd's CNN students it does NOT
    match yet. qonnx's channels-last conversion leaves a Transpose before GlobalAveragePool;
    with io_stream the emulation then hits an undefined-behaviour trap (SIGILL) in
    global_pooling2d_cl, with io_parallel it runs but agrees with qonnx on ~5% of samples."""
    try:
        import hls4ml
    except ImportError:
        raise MissingExtraError("hls4ml", "hls4ml", "hls4ml's C++ emulation") from None
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.util.cleanup import cleanup_model

    model = cleanup_model(ModelWrapper(str(model_path)))
    model = model.transform(ConvertToChannelsLastAndClean())
    model = cleanup_model(model.transform(GemmToMatMul()))
    config = hls4ml.utils.config.config_from_onnx_model(model, granularity="name", backend=backend,
                                                        default_precision=default_precision)
    hls_model = hls4ml.converters.convert_from_onnx_model(model, output_dir=str(out_dir), io_type="io_parallel",
                                                          backend=backend, hls_config=config)
    hls_model.compile()
    xs = np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)) if x.ndim == 4 else x, dtype=np.float32)
    return np.asarray(hls_model.predict(xs)).reshape(len(x), -1)


# --- runner ------------------------------------------------------------------------------------------

class QonnxRunner:
    """The ``Runner`` for QONNX bundles: qonnx's executor, for accuracy and parity only. Its
    timings would be of a Python simulator, so bench reports an FPGA bundle's speed from the
    manifest's estimate instead (``source: "estimated"``)."""

    name = "qonnx"
    estimated = True  # bench: do not time this runtime, report the bundle's estimate

    def load(self, model_path: Path, threads: int = 0) -> Any:
        _require()
        from qonnx.core.modelwrapper import ModelWrapper

        return {"path": Path(model_path), "model": ModelWrapper(str(model_path))}

    def run(self, handle: Any, x: np.ndarray) -> np.ndarray:
        return run(handle["path"], x)

    def timed_call(self, handle: Any, x: np.ndarray):
        raise EdgekdError("a QONNX bundle is not timed on the host (its executor is a simulator)",
                          "bench reports the FPGA estimate from the manifest")

    def input_info(self, handle: Any) -> dict:
        first = handle["model"].graph.input[0]
        shape = [d.dim_value or d.dim_param for d in first.type.tensor_type.shape.dim]
        return {"name": first.name, "names": [i.name for i in handle["model"].graph.input], "shape": shape,
                "fixed_batch": None}

    def describe_environment(self, handle: Any = None) -> dict:
        import qonnx

        env = host_facts()
        env.update({"runtime": "qonnx (reference executor, host)", "qonnx_version": getattr(qonnx, "__version__", None)})
        return env


RUNNER = QonnxRunner()


# --- the backend ---------------------------------------------------------------------------------

def bits_of(path: Path) -> tuple[int, int]:
    """(weight bits, activation bits) of the widest-used inner layers: the most common widths among
    the Quant nodes on weights and on activations."""
    from collections import Counter

    from qonnx.core.modelwrapper import ModelWrapper

    model = ModelWrapper(str(path))
    counts = {True: Counter(), False: Counter()}
    for node in model.get_nodes_by_op_type("Quant"):
        bits = model.get_initializer(node.input[3])
        if bits is not None and bits.size == 1 and int(bits) <= 8:  # > 8: an int32 bias
            counts[model.get_initializer(node.input[0]) is not None][int(bits)] += 1
    w = counts[True].most_common(1)[0][0] if counts[True] else 8
    a = counts[False].most_common(1)[0][0] if counts[False] else 8
    return w, a


class QonnxBackend(Backend):
    """FPGA toolflows (FINN, hls4ml) through QONNX. Export checks the file against the toolflow's
    input rules (errors stop the export) and adds, for every FPGA profile listing the target, a
    resource estimate; bench reports that estimate (``source: estimated``), never host timings."""

    name = "qonnx"
    title = "QONNX"
    flavours = ("qonnx",)
    package, extra, purpose = "qonnx", "qonnx", "executing and checking a QONNX (FPGA) bundle"
    estimated = True
    opset_min = 11
    options = {
        "cleanup": Option(bool, "run qonnx.util.cleanup (shape inference, constant folding) on export"),
        "toolflow": Option(str, "the FPGA compiler the QONNX file is meant for", ("finn", "hls4ml")),
    }

    def runner(self) -> QonnxRunner:
        _require()
        return RUNNER

    def infer(self, artifact: Path, x: np.ndarray, options: dict | None = None) -> np.ndarray:
        return run(artifact, x)

    def compile(self, onnx_path: Path, ctx: ExportContext) -> Compiled:
        toolflow = ctx.target.options.get("toolflow", "finn")
        errors = [f["message"] for f in check_rules(onnx_path, toolflow) if f["level"] == "error"]
        if errors:
            raise EdgekdError(f"the QONNX export does not meet {toolflow}'s input rules: " + "; ".join(errors[:6])
                              + (f" (and {len(errors) - 6} more)" if len(errors) > 6 else ""),
                              "distill with the same --target so that training uses its conventions")
        return Compiled(onnx_path)

    def manifest_extras(self, ctx: ExportContext) -> dict:
        path, toolflow = ctx.bundle / "model.onnx", ctx.target.options.get("toolflow", "finn")
        cost = inference_cost(path)
        estimates = {p.name: estimate(cost, p.hardware["fpga"], *bits_of(path))
                     for p in ctx.profiles if p.hardware.get("fpga")}
        for name, est in estimates.items():
            ctx.log(f"estimated on {name}: {est['bram_36k']} BRAM36 for {est['weight_kib']:.1f} KiB of weights, "
                    f"{est['mac_lanes']} {est['mac_lane'].upper()} MAC lanes, ~{est['latency_ms'] or 0:.4f} ms/image "
                    "(a heuristic, not a synthesis report)")
        return {"toolflow": toolflow, "source": "estimated", "rule_findings": check_rules(path, toolflow),
                "inference_cost": {k: v for k, v in cost.items() if k != "by_op"}, "fpga_estimates": estimates}

    def estimate(self, manifest: dict, profile: str | None) -> dict | None:
        estimates = manifest.get("fpga_estimates") or {}
        name = profile if profile in estimates else (None if profile else next(iter(estimates), None))
        return dict(estimates[name], profile=name) if name is not None else None

    def run_tapped(self, model_path: Path, model, tapped: dict, x: np.ndarray) -> dict[str, np.ndarray]:
        from .taps import qonnx_tapped

        return qonnx_tapped(model_path, tapped, x)


BACKEND = QonnxBackend()
