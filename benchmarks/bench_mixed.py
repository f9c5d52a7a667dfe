"""Issue #22's table: uniform vs mixed (depthwise at 8) vs automatic bits, through ONNX Runtime.

One float student trains first (``distill``'s float phase, no teacher; it is also the W8A8 cell, after
``--w8-epochs`` QAT epochs). Every other cell starts QAT from its weights; with ``--kd`` the float
student is also the teacher (Hinton KD at edgekd's QAT temperature: self-distillation, as in
Apprentice / QKD), without it QAT trains on labels only. Each cell is exported for ``--target``
(accuracy through the runtime on the whole test split, the manifest's ``runtime_accuracy_full``;
parity against PyTorch on the bundle's eval sample), timed with
``edgekd bench`` (batch 1, the ONNX Runtime session of the bundle, ``--threads``) and explained
(``edgekd explain``, default ``--rank auto``: the layer and the layer type it ranks first). Auto cells
(``--bits auto``) get the packed weight size of the mixed cell they are compared with as their budget.
The fp32 bundle of the float student is also quantized by ONNX Runtime's own ``quantize_static``
(QDQ, per-channel weights, MinMax and Percentile calibration on 1024 training images).

Sizes: ``packed`` is the weights at their bits, ceil(params x bits / 8) bytes per layer (what an
FPGA or a packed format stores; computed, not a file); ``onnx`` the bundle's model.onnx as written
(QDQ graphs store every width in int8 containers). Latency: measured here, by bench.

    OMP_NUM_THREADS=1 PYTHONPATH=.:benchmarks python benchmarks/bench_mixed.py --kd --train-limit 0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
# cell -> (weight bits or "auto", act bits, --layer-bits rules, the cell whose packed size an auto cell gets)
CELLS = {"W2A2": (2, 2, [], None), "W2A2 depthwise=W8A8": (2, 2, ["depthwise=W8A8"], None),
         "W2A2 depthwise=W8A8 last=A8": (2, 2, ["depthwise=W8A8", "last=A8"], None),
         "W2A2 pointwise=W8A8": (2, 2, ["pointwise=W8A8"], None),
         "auto A2 (size of depthwise=W8)": ("auto", 2, [], "W2A2 depthwise=W8A8"),
         "W4A4": (4, 4, [], None), "W4A4 depthwise=W8A8": (4, 4, ["depthwise=W8A8"], None),
         "auto A4 (size of W4)": ("auto", 4, [], "W4A4")}


def build(name: str):
    from bench_mobile import build as build_model

    return build_model(name)


def cpu_flags() -> str:
    flags = set(open("/proc/cpuinfo").read().split()) & {"avx2", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp"}
    return " ".join(sorted(flags))


def packed_bytes(args, wbits: int, rules: list[str]) -> int:
    """Packed weight bytes of the student quantized at ``wbits`` with ``rules`` for ``args.target``."""
    from edgekd import catalog
    from edgekd.quant import autobits
    from edgekd.quant.spec import spec_for_target

    spec = spec_for_target(catalog.load_target(args.target), wbits, 8, layer_bits=rules)
    layers = autobits.layers_of(build(args.model), spec)
    return autobits.total(layers, {layer.name: wbits for layer in layers})


def float_step(args, work: Path) -> tuple[Path, dict]:
    """The float student (and the W8A8 cell): float.pt, the run's metrics."""
    from edgekd import api

    torch.manual_seed(args.seed)
    opts = api.DistillOptions(data=args.data, method="none", weight_bits=8, act_bits=8, float_epochs=args.float_epochs,
                              epochs=args.w8_epochs, lr=args.lr, train_limit=args.train_limit or None, seed=args.seed,
                              target=args.target, progress=False)
    m = api.distill(opts, out=work / "W8A8" / "run", overwrite=True, student=build(args.model))
    shutil.copy(Path(m["run_dir"]) / "float.pt", work / "float.pt")
    return work / "float.pt", m


def loaded(args, float_pt: Path):
    model = build(args.model)
    model.load_state_dict(torch.load(float_pt, weights_only=True)["state_dict"])
    return model


def train_cell(args, label: str, float_pt: Path, work: Path, sizes: dict) -> dict:
    from edgekd import api

    wbits, abits, rules, size_of = CELLS[label]
    extra = {"auto_bits": True, "budget": f"size={sizes[size_of]}B"} if wbits == "auto" else {"weight_bits": wbits}
    teacher = loaded(args, float_pt).eval() if args.kd else None
    opts = api.DistillOptions(data=args.data, method="hinton" if args.kd else "none", act_bits=abits,
                              layer_bits=rules or None, float_epochs=0, epochs=args.epochs, lr=args.lr, qat_lr=args.qat_lr,
                              train_limit=args.train_limit or None, seed=args.seed, target=args.target,
                              progress=False, **extra)
    torch.manual_seed(args.seed)
    return api.distill(opts, out=work / slug(label) / "run", overwrite=True, student=loaded(args, float_pt),
                       teacher=teacher, student_trained=True)  # float.pt in the run: explain's reference


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label)


def measure(args, label: str, m: dict, work: Path) -> dict:
    """Export, bench and explain one trained cell."""
    from edgekd import api
    from edgekd.pipeline.explain import explain

    bundle = work / slug(label) / "bundle"
    manifest = api.export(m["run_dir"], args.target, out=bundle, overwrite=True, student=build(args.model))
    bench = api.bench([bundle], threads=args.threads, batch_sizes=(1,), warmup_s=0.5, min_time_s=2.0)[0]
    why = explain(bundle, samples=args.explain_samples, student=build(args.model))
    auto = m.get("auto_bits") or {}
    return {"cell": label, "layer_bits": m.get("layer_bits"), "fake_quant": m["student_accuracy"],
            "runtime": whole_split(manifest), "runtime_sample": manifest["runtime_accuracy"],
            "parity": manifest["parity"]["top1_agreement"],
            "packed_bytes": packed_from_explain(why), "onnx_bytes": (bundle / "model.onnx").stat().st_size,
            "latency_ms": (bench.get("latency_ms") or {}), "bench_error": bench.get("error"),
            "auto_budget": auto.get("budget"), "worst_layers": [r["name"] for r in why["layers"][:3]],
            "explain_rank": why["rank"], "noise_shares": [(g["group"], g["noise_share"], g["raise_bytes"])
                                                          for g in why["groups"]],
            "worst_type": why["groups"][0]["group"], "worst_alone": min(why["groups"], key=alone_key)["group"],
            "groups": [(g["group"], g["gain_db"], g["alone_db"]) for g in why["groups"]], "explain": why,
            "qat_loss": [round(r["loss"], 4) for r in m["history"] if r["phase"] == "qat"], "run_dir": m["run_dir"]}


def whole_split(manifest: dict) -> float:
    """Accuracy through the runtime on the whole test split (``runtime_accuracy`` is the bundle's eval
    sample, 2,000 images by default: not what the table's baselines are measured on)."""
    full = manifest.get("runtime_accuracy_full")
    if full is None:
        raise SystemExit(f"the bundle has no whole-split accuracy (test_samples {manifest.get('test_samples')})")
    return full


def alone_key(g: dict) -> float:
    return float("inf") if g["alone_db"] is None else g["alone_db"]


def packed_from_explain(why: dict) -> int:
    """Packed weight bytes of the explained model (its layers' parameters at their weight bits)."""
    from edgekd.quant.autobits import packed_bytes as packed

    return sum(packed(r["params"], r["weight_bits"]) for r in why["layers"])


def ort_ptq(args, work: Path, float_run: str, calib: int = 1024) -> list[dict]:
    """ONNX Runtime's quantize_static of the float student's fp32 bundle, on the whole test split."""
    from bench_accuracy import ort_static

    from edgekd import api
    from edgekd.pipeline.evalset import read_test_split

    bundle = work / "fp32" / "bundle"
    api.export(float_run, args.target, out=bundle, overwrite=True, student=build(args.model), float_model=True)
    data = read_test_split(torch.load(Path(float_run) / "float.pt", weights_only=True)["meta"])
    idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:calib].numpy()
    xc = np.ascontiguousarray(data.train.take(idx), dtype=np.float32)
    xt, yt = np.ascontiguousarray(data.test.take(np.arange(len(data.test))), dtype=np.float32), np.asarray(data.test.y)
    fp32_acc, _, done = ort_static(bundle / "model.onnx", xc, xt, yt, work / "ort-ptq",
                                   [(8, "MinMax"), (8, "Percentile"), (4, "MinMax")])
    rows = [{"cell": "fp32 (ONNX Runtime)", "runtime": fp32_acc, "onnx_bytes": (bundle / "model.onnx").stat().st_size}]
    for r in done:
        rows.append({"cell": f"ORT quantize_static W{r['bits']}A{r['bits']} {r['method']}", "runtime": r["accuracy"]}
                    | ({"onnx_bytes": r["path"].stat().st_size} if r["accuracy"] is not None else {"error": r["error"]}))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write(rows: list[dict], budget: str, name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"budget": budget, "rows": rows}, indent=1) + "\n")
    pct = lambda v: "-" if v is None else f"{v:.2%}"  # noqa: E731
    lines = [f"Budget: {budget}", "", "| cell | PyTorch (fake-quant) | ONNX Runtime | parity | packed weights | model.onnx | "
             "latency p50 (batch 1) | explain (--rank auto): first type: layers | worst type alone |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = (r.get("latency_ms") or {}).get("p50")
        lines.append(f"| {r['cell']} | {pct(r.get('fake_quant'))} | {pct(r.get('runtime'))} | "
                     f"{r['parity'] if 'parity' in r else '-'} | {r.get('packed_bytes', '-')} B | "
                     f"{r.get('onnx_bytes', '-')} B | {f'{lat:.3f} ms' if lat else '-'} | "
                     f"{r.get('worst_type') or '-'} ({r.get('explain_rank', '-')}): "
                     f"{', '.join(r.get('worst_layers') or []) or '-'} | {r.get('worst_alone') or '-'} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobile-student", help="mobile-student or torchvision:mobilenet_v3_small")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--train-limit", type=int, default=6000, help="0: every training image")
    p.add_argument("--float-epochs", type=int, default=8)
    p.add_argument("--w8-epochs", type=int, default=1, help="QAT epochs of the W8A8 cell (trained with the float)")
    p.add_argument("--epochs", type=int, default=6, help="QAT epochs of every other cell")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--qat-lr", type=float, default=None,
                   help="QAT lr of the low-bit cells (default: edgekd's; at 0.005 the 60k-image W2A2/W4A4 cells diverged)")
    p.add_argument("--kd", action="store_true", help="the float student teaches every QAT cell (Hinton KD)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", default="onnxruntime-cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--explain-samples", type=int, default=500)
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, of: {', '.join(CELLS)}")
    p.add_argument("--float-from", help="float.pt of an earlier run of this script (its W8A8 run beside it)")
    p.add_argument("--work", default="runs/bench_mixed")
    p.add_argument("--name", default="mixed", help="results/NAME.{json,md}")
    p.add_argument("--skip-baselines", action="store_true", help="no fp32, ORT quantize_static and W8A8 rows")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.float_from:
        w8_run = Path(args.float_from).parent / "W8A8" / "run"
        float_pt, w8 = Path(args.float_from), json.loads((w8_run / "metrics.json").read_text()) | {
            "run_dir": str(w8_run)}
    else:
        float_pt, w8 = float_step(args, work)
    rows = [{"cell": "float (PyTorch)", "fake_quant": w8["student_float_accuracy"], "runtime": None}]
    if not args.skip_baselines:
        rows += ort_ptq(args, work, w8["run_dir"])
        rows.append(measure(args, "W8A8", w8, work))
    sizes = {label: packed_bytes(args, CELLS[label][0], CELLS[label][2]) for label in CELLS if CELLS[label][0] != "auto"}
    for label in [c.strip() for c in args.cells.split(",")]:
        rows.append(measure(args, label, train_cell(args, label, float_pt, work, sizes), work))
        if CELLS[label][0] == "auto":
            rows[-1]["auto_budget"] = f"size={sizes[CELLS[label][3]]}B"
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "explain"}), flush=True)
        write(rows, budget_text(args, time.time() - t0, w8), args.name)


def budget_text(args, seconds: float, w8: dict) -> str:
    images = f"first {args.train_limit}" if args.train_limit else "all"
    made = (f"float student from {args.float_from}" if args.float_from else
            f"{args.float_epochs} float epochs (lr {args.lr}), W8A8 {args.w8_epochs} QAT epoch(s)")
    return (f"{args.model}, {args.data}, {images} training images, {made} (float student "
            f"{w8['student_float_accuracy']:.2%} in PyTorch), "
            f"{args.epochs} QAT epochs per other cell (QAT lr {args.qat_lr or 'edgekd default'}), {'KD from the float student' if args.kd else 'QAT only'}, "
            f"target {args.target}, seed {args.seed}, {torch.get_num_threads()} training thread(s), bench "
            f"{args.threads} thread(s), CPU flags {cpu_flags()}, {seconds:.0f}s")


if __name__ == "__main__":
    main()
