"""Does `edgekd bench` report the latency an independent, minimal timing loop measures?

Builds a small float CNN with onnx.helper (no torch) - or takes --model FILE.onnx - wraps it in a
bundle, then in one process alternates, round by round (A B, B A, A B...), between
- edgekd bench: ``edgekd.bench.bench_bundle`` (fresh session, warm-up, timed runs, p50), and
- a minimal loop: its own ``onnxruntime.InferenceSession``, 10 warm-up runs, then ``session.run``
  timed one call at a time with ``time.perf_counter``, median of the runs,
with the same thread setting and the same number of timed runs (--iterations; bench's minimum
time is 0 unless --min-time is given). Alternating spreads drift (thermal, other processes) over
both methods equally.

Reported: per method the median over rounds of each round's p50, the spread of those round p50s
(min..max), the mean within-round std; and the paired difference (bench / loop - 1) as the median
of per-round ratios. Target: |difference| <= 5%.
Writes benchmarks/results/bench_timing.json. Usage: python benchmarks/bench_timing.py [--rounds 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgekd import bench
from edgekd.backends.onnxruntime import describe_environment
from edgekd.catalog import BenchSettings
from edgekd.core.fsutil import write_json

RESULTS = Path(__file__).resolve().parent / "results" / "bench_timing.json"
TARGET = 0.05


def build_cnn(path: Path, size: int = 64, classes: int = 10) -> None:
    """Conv(3->32, s1) ReLU, Conv(32->64, s2) ReLU, Conv(64->64, s2) ReLU, GAP, Gemm(64->classes)."""
    rng = np.random.default_rng(0)
    convs = [(3, 32, 1), (32, 64, 2), (64, 64, 2)]
    nodes, inits, prev = [], [], "input"
    for i, (cin, cout, stride) in enumerate(convs):
        w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1],
                                   strides=[stride, stride]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev = f"r{i}"
    inits.append(numpy_helper.from_array(rng.standard_normal((classes, 64)).astype(np.float32), "fc"))
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "timing_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _dims(shape) -> list[int]:
    return [d if isinstance(d, int) else 1 for d in shape]


def make_bundle(model: Path, root: Path, n: int = 32) -> Path:
    """A bundle around ``model``: input and class count read from the model, random eval data."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    first, out = session.get_inputs()[0], session.get_outputs()[0]
    shape, classes = _dims(first.shape)[1:], _dims(out.shape)[-1]
    bundle = root / "timing"
    bundle.mkdir()
    (bundle / "model.onnx").write_bytes(model.read_bytes())
    rng = np.random.default_rng(0)
    np.savez(bundle / "eval.npz", x=rng.standard_normal((n, *shape)).astype(np.float32),
             y=rng.integers(0, classes, n).astype(np.int64))
    files = {f: hashlib.sha256((bundle / f).read_bytes()).hexdigest() for f in ("model.onnx", "eval.npz")}
    manifest = {"name": "timing", "target": "onnxruntime-cpu", "backend": "onnxruntime", "format": "fp32",
                "model_file": "model.onnx", "weight_bits": None, "act_bits": None, "input_shape": shape,
                "input_name": first.name, "classes": [str(i) for i in range(classes)],
                "normalization": {"mean": [0.0], "std": [1.0]}, "torch_accuracy": None,
                "parity": {"n": 0, "top1_agreement": None, "max_abs_diff": None}, "files": files,
                "edgekd_version": "benchmark"}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


def minimal_loop(model: Path, x: np.ndarray, runs: int, threads: int) -> list[float]:
    """Seconds per call of a plain session.run loop after 10 warm-up calls."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    for _ in range(10):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return times


def one_round(bundle: Path, settings: BenchSettings, bench_first: bool) -> dict:
    """One bench measurement and one minimal-loop measurement with the same number of runs."""
    result = {}
    order = ("bench", "loop") if bench_first else ("loop", "bench")
    for method in order:
        if method == "bench":
            [row] = bench.bench_bundle(bundle, settings)
            if row.status != "ok":
                raise SystemExit(f"bench failed: {row.error}")
            result["bench"] = {"p50": row.latency_ms["p50"], "std": row.latency_ms["std"], "runs": row.timed_runs}
        else:
            x = np.load(bundle / "eval.npz")["x"][:1].copy()
            ms = np.asarray(minimal_loop(bundle / "model.onnx", x, settings.iterations, settings.threads)) * 1e3
            result["loop"] = {"p50": float(statistics.median(ms)), "std": float(ms.std()), "runs": len(ms)}
    return result


def summarize(rounds: list[dict]) -> dict:
    out = {}
    for method in ("bench", "loop"):
        p50s = [r[method]["p50"] for r in rounds]
        out[method] = {"p50_ms": statistics.median(p50s), "round_min_ms": min(p50s), "round_max_ms": max(p50s),
                       "within_round_std_ms": statistics.mean(r[method]["std"] for r in rounds)}
    ratios = [r["bench"]["p50"] / r["loop"]["p50"] - 1 for r in rounds]
    out["difference"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                         "target": TARGET, "within_target": abs(statistics.median(ratios)) <= TARGET}
    return out


def render(summary: dict, rounds: int) -> str:
    lines = [f"{'method':<14}{'p50 ms':>10}{'round min':>11}{'round max':>11}{'std in round':>14}   ({rounds} rounds)"]
    for method, label in (("bench", "edgekd bench"), ("loop", "minimal loop")):
        s = summary[method]
        lines.append(f"{label:<14}{s['p50_ms']:>10.4f}{s['round_min_ms']:>11.4f}{s['round_max_ms']:>11.4f}"
                     f"{s['within_round_std_ms']:>14.4f}")
    d = summary["difference"]
    lines.append(f"bench/loop - 1: median {100 * d['median']:+.2f}% (per-round {100 * d['min']:+.2f}% .. "
                 f"{100 * d['max']:+.2f}%); target |diff| <= {100 * TARGET:.0f}%: "
                 f"{'PASS' if d['within_target'] else 'FAIL'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="an ONNX model (default: a small CNN built here)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--min-time", type=float, default=0.0,
                        help="bench's minimum timed seconds; 0 (default): both methods time exactly --iterations runs")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads for both methods (default 1: least disturbed by other processes)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    settings = BenchSettings(threads=args.threads, warmup=10, warmup_s=0.2, iterations=args.iterations,
                             min_time_s=args.min_time, batch_sizes=(1,))
    with tempfile.TemporaryDirectory(prefix="edgekd-timing-") as tmp:
        model = args.model or Path(tmp) / "cnn.onnx"
        if args.model is None:
            build_cnn(model)
        bundle = make_bundle(model, Path(tmp))
        rounds = [one_round(bundle, settings, bench_first=i % 2 == 0) for i in range(args.rounds)]
    summary = summarize(rounds)
    print(render(summary, args.rounds))
    write_json(args.out, {"model": str(args.model or "built-in CNN 3x64x64"), "settings": dataclasses.asdict(settings),
                          "summary": summary, "rounds": rounds, "environment": describe_environment()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
