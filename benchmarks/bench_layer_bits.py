"""Mixed precision on the mobile student (#22): W2A2 with and without 8-bit depthwise layers, through
ONNX Runtime, and what ``edgekd explain`` names as the worst layers at uniform 2 bits.

The float student (``mobile-student`` of bench_mobile.py) trains once, with ``distill``'s float phase
(QAT-only method ``none``, no teacher, as bench_mobile.py); every cell starts QAT from it and trains
``--epochs`` at edgekd's default QAT learning rate. Each cell is exported for ``--target`` (ONNX
Runtime; ``runtime`` is the manifest's ``runtime_accuracy_full``, on the whole test split, and
``runtime_sample`` the bundle's eval sample) and explained on the bundle's eval samples. Results:
``results/layer_bits.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/bench_layer_bits.py          # Fashion-MNIST, 6000 images
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from bench_mobile import mobile_student

RESULTS = Path(__file__).parent / "results"
CELLS = {"W2A2": None, "W2A2 depthwise=W8A8": ["depthwise=W8A8"], "W2A2 depthwise=W8": ["depthwise=W8"],
         "W2A2 last=A8": ["last=A8"], "W2A2 depthwise=W8A8 last=A8": ["depthwise=W8A8", "last=A8"]}


def _cell(args, label: str, rules, float_pt: Path | None, work: Path) -> dict:
    from edgekd import api
    from edgekd.pipeline.explain import explain

    model = mobile_student()
    if float_pt is not None:
        model.load_state_dict(torch.load(float_pt, weights_only=True)["state_dict"])
    out = work / label.replace(" ", "_").replace("=", "-")
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(args.seed)
    opts = api.DistillOptions(data=args.data, method="none", weight_bits=2, act_bits=2, layer_bits=rules,
                              float_epochs=0 if float_pt is not None else args.float_epochs, epochs=args.epochs,
                              lr=args.lr, train_limit=args.train_limit or None, seed=args.seed, target=args.target,
                              progress=False)
    m = api.distill(opts, out=out / "run", student=model)
    manifest = api.export(out / "run", args.target, out=out / "bundle", student=mobile_student())
    why = explain(out / "bundle", samples=args.explain_samples, student=mobile_student())
    return {"cell": label, "layer_bits": m["layer_bits"], "float": m["student_float_accuracy"],
            "fake_quant": m["student_accuracy"], "runtime": manifest["runtime_accuracy_full"],
            "runtime_sample": manifest["runtime_accuracy"],
            "parity": manifest["parity"]["top1_agreement"], "float_compute": (manifest.get("fusion") or {}).get(
                "float_compute"),
            "worst": [(r["name"], r["type"], r["weight_bits"], r["act_bits"], r["logits_db"]) for r in why["layers"][:4]],
            "layers": why["layers"], "run_dir": str(out / "run")}


def write(rows: list[dict], budget: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "layer_bits.json").write_text(json.dumps({"budget": budget, "rows": rows}, indent=1) + "\n")
    lines = [f"Budget: {budget}", "", "| cell | float | fake-quant | ONNX Runtime | parity | float Conv/Gemm left | "
             "worst layers (explain: logits dB, that layer alone) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        worst = ", ".join(f"{n} {t} W{w}A{a} {db:.1f}" if db is not None else f"{n} exact" for n, t, w, a, db in r["worst"])
        lines.append(f"| {r['cell']} | {r['float']:.2%} | {r['fake_quant']:.2%} | {r['runtime']:.2%} | "
                     f"{r['parity']:.4f} | {r['float_compute']} | {worst} |")
    (RESULTS / "layer_bits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--train-limit", type=int, default=6000, help="0: every training image")
    p.add_argument("--float-epochs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=3, help="QAT epochs of every cell")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", default="onnxruntime-cpu")
    p.add_argument("--explain-samples", type=int, default=500)
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, of: {', '.join(CELLS)}")
    p.add_argument("--work", default="runs/bench_layer_bits")
    p.add_argument("--float-from", help="float.pt of an earlier run of this script: skip the float phase")
    p.add_argument("--float-accuracy", type=float, help="with --float-from: that float student's test accuracy")
    p.add_argument("--no-write", action="store_true", help="print only (a smoke run)")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0, rows, float_pt = time.time(), [], Path(args.float_from) if args.float_from else None
    for label in [c.strip() for c in args.cells.split(",")]:
        rows.append(_cell(args, label, CELLS[label], float_pt, work))
        if float_pt is None:  # the first cell trained the float student: the others start from it
            float_pt = work / "float.pt"
            shutil.copy(Path(rows[-1]["run_dir"]) / "float.pt", float_pt)
        rows[-1]["float"] = rows[0]["float"] if rows[0]["float"] is not None else args.float_accuracy
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "layers"}), flush=True)
    flags = sorted(set(open("/proc/cpuinfo").read().split()) & {"avx2", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})
    images = f"first {args.train_limit}" if args.train_limit else "all"
    budget = (f"{args.data}, {images} training images, {args.float_epochs} float epochs (lr {args.lr}), "
              f"{args.epochs} QAT epochs per cell, QAT only (no teacher), target {args.target}, seed {args.seed}, "
              f"{torch.get_num_threads()} thread(s), CPU flags {' '.join(flags)}, {time.time() - t0:.0f}s")
    if not args.no_write:
        write(rows, budget)


if __name__ == "__main__":
    main()
