"""Quantized distillation against the alternatives on Fashion-MNIST: fp32, PTQ, QAT, KD+QAT at 8/4/2 bits.

One resumable command builds the whole table with edgekd's own defaults (the ones `edgekd distill`
uses): the default teacher (cnnfc-teacher) trained once, the default student (cnnfc-student,
64k parameters), 12 float epochs, then 4 QAT epochs (12 at 2 bits), Hinton KD at T=4 (T=1 in the QAT phase at 2 bits),
alpha=0.9.

    nice python benchmarks/bench_accuracy.py [--root runs/bench-accuracy] [--seeds 0,1,2] [--parallel]

The numbers in the README were made with OMP_NUM_THREADS=1 and --parallel on a 2-core machine.

Stages (each skipped when its result is on disk, so an interrupted run resumes where it stopped):
  1. `edgekd train --data fashion-mnist` -> ROOT/teacher (seed 0, shared by every cell)
  2. `edgekd sweep --bits 8,4 --methods none,hinton,ptq --reference --seed 0` -> ROOT/seed0
     (none = QAT alone from a float CE student; hinton = KD+QAT; ptq = Brevitas PTQ of the
     CE float student; fp32 = that float student exported unquantized)
  3. `edgekd sweep --bits 4 --methods none,hinton --seeds 1,2` -> ROOT/more-seeds
  4. `edgekd sweep --bits 2 --methods M --seeds 0,1,2` -> ROOT/w2-none and ROOT/w2-hinton (2-bit
     cells get their own QAT epoch default, so they are sweeps of their own; each cell trains its
     float phase, the same 12 epochs as stage 2's)
  5. ONNX Runtime's own quantize_static of the fp32 bundle's model (QDQ, per-channel weights,
     1,024 training images for calibration; MinMax, Entropy, Percentile at 8 bits, MinMax at 4 bits).
With --parallel, stages 2 and 3 run side by side, then the two sweeps of stage 4.
Every accuracy is through ONNX Runtime on all 10,000 test images (the manifest's
runtime_accuracy_full); the top-1 agreement with PyTorch is over the same 10,000 images.
Writes benchmarks/results/accuracy.{json,md,png}. With --collect-only --previous OLD.json, cells (and
ONNX Runtime rows) not on disk under ROOT are taken from an earlier accuracy.json, each marked with
"from" and listed under the table, so a changed default can be re-measured without redoing the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
COLUMNS = [("fp32", 32), ("ptq", 8), ("none", 8), ("hinton", 8), ("ptq", 4), ("none", 4), ("hinton", 4),
           ("none", 2), ("hinton", 2)]
LABEL = {"fp32": "fp32", "ptq": "PTQ", "none": "QAT", "hinton": "KD+QAT"}


def edgekd(*args, wait: bool = True):
    cmd = [sys.executable, "-m", "edgekd", *map(str, args)]
    print("$", " ".join(cmd[2:]), flush=True)
    proc = subprocess.Popen(cmd)
    if wait and proc.wait() != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd[2:])}")
    return proc


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in flags)


def cell_record(root: Path, name: str, method: str, bits: int, seed: int) -> dict | None:
    """Accuracy (ORT, whole test split), agreement and wall times of one sweep cell."""
    run = root / "runs" / name
    bundle = root / "bundles" / name
    if not (bundle / "manifest.json").is_file():
        return None
    manifest = json.loads((bundle / "manifest.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    epochs: dict[str, list[float]] = {}  # per phase: epoch durations (history seconds are cumulative per phase)
    last_phase, last = None, 0.0
    for h in metrics.get("history", []):
        phase, sec = h.get("phase", "?"), float(h.get("seconds") or 0.0)
        if phase != last_phase or sec < last:
            last = 0.0
        epochs.setdefault(phase, []).append(sec - last)
        last_phase, last = phase, sec
    phases = {p: {"epochs": len(v), "seconds": sum(v), "median_epoch_s": statistics.median(v)} for p, v in epochs.items()}
    return {"method": method, "bits": bits, "seed": seed, "cell": name,
            "accuracy": manifest.get("runtime_accuracy_full"), "torch_accuracy": manifest.get("torch_accuracy_full"),
            "agreement": manifest.get("top1_agreement_full"), "test_samples": manifest.get("test_samples"),
            "train_seconds": metrics.get("seconds"), "phase_seconds": phases,
            "started_from": metrics.get("student_weights") or metrics.get("source_run")}


def collect(root: Path, seeds: list[int]) -> list[dict]:
    rows = []
    tagged = len(seeds) > 1  # a sweep over one seed leaves the seed out of the names
    for method, bits in COLUMNS:
        base = "fp32" if method == "fp32" else f"bits{bits}-{method}"
        if bits == 2:
            for s in seeds:
                r = cell_record(root / f"w2-{method}", f"{base}-s{s}" if tagged else base, method, bits, s)
                rows += [r] if r else []
            continue
        r = cell_record(root / "seed0", base, method, bits, 0)
        rows += [r] if r else []
        if method in ("none", "hinton") and bits == 4:
            for s in seeds[1:]:
                name = f"{base}-s{s}" if len(seeds) > 2 else base
                r = cell_record(root / "more-seeds", name, method, bits, s)
                rows += [r] if r else []
    return rows


def ort_static(fp32: Path, xc: np.ndarray, xt: np.ndarray, yt: np.ndarray, dest: Path,
               plans: list[tuple[int, str]]) -> tuple[float, np.ndarray, list[dict]]:
    """ONNX Runtime's quantize_static of the fp32 model ``fp32`` (QDQ, per-channel weights) for each of
    ``plans`` (bits 8 or 4, calibration method), calibrated on ``xc``, evaluated on (``xt``, ``yt``):
    the fp32 model's accuracy and predictions, and per plan its bits, method, file, accuracy and
    predictions (or the error, when the installed ORT refuses the plan)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    name = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    types = {8: (QuantType.QInt8, QuantType.QUInt8), 4: (QuantType.QInt4, QuantType.QUInt4)}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: xc[i: i + 64]} for i in range(0, len(xc), 64)])

        def get_next(self):
            return next(self.it, None)

    def predict(path: Path) -> np.ndarray:
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {name: xt[i: i + 1000]})[0].argmax(1) for i in range(0, len(xt), 1000)])

    fp32_pred, out = predict(fp32), []
    dest.mkdir(parents=True, exist_ok=True)
    for bits, method in plans:
        path = dest / f"w{bits}a{bits}-{method.lower()}.onnx"
        row = {"bits": bits, "method": method, "path": path}
        try:
            quantize_static(str(fp32), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=types[bits][0], activation_type=types[bits][1],
                            calibrate_method=getattr(CalibrationMethod, method))
            pred = predict(path)
            out.append(row | {"accuracy": float((pred == yt).mean()), "pred": pred})
        except Exception as e:  # a plan the installed ORT refuses is reported, not hidden
            out.append(row | {"accuracy": None, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    return float((fp32_pred == yt).mean()), fp32_pred, out


def ort_ptq(root: Path, calib: int) -> list[dict]:
    """ONNX Runtime's quantize_static of the fp32 bundle's model, evaluated on the whole test split."""
    from edgekd.pipeline.evalset import read_test_split

    bundle, run = root / "seed0" / "bundles" / "fp32", root / "seed0" / "runs" / "bits8-none"
    if not (bundle / "model.onnx").is_file():
        return []
    import torch

    from edgekd import models

    _, meta = models.load_model(run / "float.pt")
    data = read_test_split(meta)
    # the same calibration images as edgekd quantize (seed 0)
    idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:calib].numpy()
    xc = np.ascontiguousarray(data.train.take(idx), dtype=np.float32)
    xt, yt = np.ascontiguousarray(data.test.take(np.arange(len(data.test))), dtype=np.float32), np.asarray(data.test.y)
    started = time.perf_counter()
    plans = [(8, "MinMax"), (8, "Entropy"), (8, "Percentile"), (4, "MinMax")]
    fp32_acc, fp32_pred, done = ort_static(bundle / "model.onnx", xc, xt, yt, root / "ort-ptq", plans)
    out = []
    for r in done:
        row = {"method": f"ort-ptq-{r['method'].lower()}", "bits": r["bits"], "seed": 0, "accuracy": r["accuracy"]}
        if r["accuracy"] is None:
            out.append(row | {"error": r["error"]})
        else:
            out.append(row | {"fp32_accuracy_ort": fp32_acc, "agreement_with_fp32": float((r["pred"] == fp32_pred).mean()),
                              "seconds": (time.perf_counter() - started) / len(plans), "calib_samples": calib})
        print(f"ORT quantize_static W{r['bits']}A{r['bits']} {r['method']}: {row['accuracy']}", flush=True)
    return out


def with_previous(rows: list[dict], ort_rows: list[dict], path: Path) -> dict:
    """Add to ``rows`` (and ``ort_rows``, when empty) what an earlier accuracy.json has and ROOT has not."""
    old = json.loads(path.read_text())
    have = {(r["cell"], r["seed"]) for r in rows}
    taken = [dict(r, **{"from": str(path)}) for r in old["cells"] if (r["cell"], r["seed"]) not in have]
    rows += taken
    rows.sort(key=lambda r: (COLUMNS.index((r["method"], r["bits"])), r["seed"]))
    if not ort_rows:
        ort_rows += [dict(r, **{"from": str(path)}) for r in old.get("ort_ptq", [])]
    return {"file": str(path), "cells": [cell_id(r) for r in taken],
            "teacher_accuracy": old["meta"].get("teacher_accuracy"), "int8_flags": old["meta"].get("int8_flags")}


def cell_id(row: dict) -> str:
    """A cell's name with its seed (one-seed sweeps leave the seed out of their cell names)."""
    return row["cell"] + ("" if row["cell"].endswith(f"-s{row['seed']}") else f"-s{row['seed']}")


def summarise(rows: list[dict]) -> list[dict]:
    cols = []
    for method, bits in COLUMNS:
        got = [r for r in rows if r["method"] == method and r["bits"] == bits and r["accuracy"] is not None]
        accs = [r["accuracy"] for r in got]
        cols.append({"column": LABEL[method] + ("" if method == "fp32" else f" W{bits}A{bits}"), "method": method,
                     "bits": bits, "seeds": len(accs), "mean": statistics.mean(accs) if accs else None,
                     "min": min(accs) if accs else None, "max": max(accs) if accs else None,
                     "min_agreement": min((r["agreement"] for r in got if r["agreement"] is not None), default=None),
                     "train_seconds": [r["train_seconds"] for r in got]})
    return cols


def markdown(cols: list[dict], ort_rows: list[dict], meta: dict) -> str:
    def cell(c):
        if c["mean"] is None:
            return "not run"
        s = f"{100 * c['mean']:.2f}"
        return s + (f" ({100 * c['min']:.2f}..{100 * c['max']:.2f})" if c["seeds"] > 1 else "")

    lines = ["| " + " | ".join(c["column"] for c in cols) + " |", "|" + "---|" * len(cols),
             "| " + " | ".join(cell(c) for c in cols) + " |",
             "| " + " | ".join(f"{c['seeds']} seed(s)" for c in cols) + " |",
             "| " + " | ".join("-" if c["min_agreement"] is None else f"agree >= {100 * c['min_agreement']:.2f}%"
                               for c in cols) + " |",
             "| " + " | ".join(", ".join(f"{s:.0f} s" for s in c["train_seconds"] if s is not None) or "-"
                               for c in cols) + " |", "",
             "Rows: test accuracy through ONNX Runtime on all 10,000 test images (mean and min..max over seeds); "
             "seeds; the lowest ORT/PyTorch top-1 agreement over those images; each cell's training wall time "
             "(PTQ: calibration). Cells of one method and seed share a float phase: every cell after the first bit "
             "width of its sweep (8 bits for seed 0, 4 bits for the other seeds) starts from that cell's float "
             "student, so its time is QAT only.", ""]
    lines += ["ONNX Runtime quantize_static of the same fp32 student (QDQ, per-channel, "
              f"{ort_rows[0]['calib_samples'] if ort_rows and 'calib_samples' in ort_rows[0] else 1024} calibration images):", ""]
    for r in ort_rows:
        acc = "error: " + r["error"] if r.get("accuracy") is None else f"{100 * r['accuracy']:.2f}%"
        lines.append(f"- W{r['bits']}A{r['bits']} {r['method']}: {acc}")
    ratios = meta.get("qat_over_float_epoch") or {}
    lines += ["", "QAT epoch / float epoch (medians, same run): " + (", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
                                                                 or "-")]
    lines += ["", f"Machine: {meta['cpu']} ({meta['cores']} cores, int8 flags: {meta['int8_flags']}); "
              f"teacher {_pct(meta.get('teacher_accuracy'))} in {_secs(meta.get('teacher_seconds'))}."]
    if meta.get("previous"):
        prev = meta["previous"]
        lines += ["", f"From an earlier run of this script ({prev['file']}: teacher {_pct(prev['teacher_accuracy'])}, "
                  f"int8 flags {prev['int8_flags']}), not re-measured: {', '.join(prev['cells'])}"
                  + (", and the ONNX Runtime rows." if any(r.get("from") for r in ort_rows) else ".")]
    return "\n".join(lines) + "\n"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _secs(v) -> str:
    return "-" if v is None else f"{v:.0f} s"


def plot(cols: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(10, 4))
    shown = [c for c in cols if c["mean"] is not None]
    x = range(len(shown))
    ax.bar(x, [100 * c["mean"] for c in shown], color=["#888" if c["method"] in ("fp32", "ptq") else
                                                      "#4a7" if c["method"] == "hinton" else "#47a" for c in shown])
    ax.errorbar(x, [100 * c["mean"] for c in shown], yerr=[[100 * (c["mean"] - c["min"]) for c in shown],
                                                            [100 * (c["max"] - c["mean"]) for c in shown]],
                fmt="none", ecolor="k", capsize=3)
    ax.set_xticks(list(x), [c["column"] for c in shown], rotation=30, ha="right")
    lo = min(100 * c["min"] for c in shown) if shown else 0
    ax.set_ylim(max(0, lo - 2), 100)
    ax.set_ylabel("test accuracy through ONNX Runtime (%)")
    ax.set_title("Fashion-MNIST, cnnfc-student (64k params), edgekd defaults")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/bench-accuracy", type=Path)
    ap.add_argument("--seeds", default="0,1,2", help="the first seed runs every cell, the others W4A4/W2A2 QAT and KD+QAT")
    ap.add_argument("--calib-samples", type=int, default=1024)
    ap.add_argument("--collect-only", action="store_true", help="write the table from what is on disk")
    ap.add_argument("--name", default="accuracy")
    ap.add_argument("--previous", type=Path, help="an earlier accuracy.json: cells not on disk are taken from it")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--parallel", action="store_true",
                    help="run the two sweeps side by side (with OMP_NUM_THREADS=1: one core each)")
    ap.add_argument("--smoke", action="store_true", help="1 epoch per phase (checks the script, not the numbers)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    root, started = args.root, time.time()
    teacher = root / "teacher"
    short = ["--epochs", 1, "--float-epochs", 1] if args.smoke else []
    common = ["--data", args.data, "--teacher", teacher / "model.pt", "-q", *short]
    if not args.collect_only:
        if not (teacher / "model.pt").is_file():
            edgekd("train", "--data", args.data, "--out", teacher, "-q", *(["--epochs", 1] if args.smoke else []))
        procs = [edgekd("sweep", *common, "--bits", "8,4", "--methods", "none,hinton,ptq", "--reference", "--seed",
                        seeds[0], "--out", root / "seed0", wait=not args.parallel)]
        if len(seeds) > 1:
            procs.append(edgekd("sweep", *common, "--bits", "4", "--methods", "none,hinton", "--seeds",
                                ",".join(map(str, seeds[1:])), "--out", root / "more-seeds", wait=not args.parallel))
        if any(p.wait() != 0 for p in procs):
            raise SystemExit("a sweep failed; run the same command again to resume")
        procs = [edgekd("sweep", *common, "--bits", "2", "--methods", method, "--seeds", ",".join(map(str, seeds)),
                        "--out", root / f"w2-{method}", wait=not args.parallel) for method in ("none", "hinton")]
        if any(p.wait() != 0 for p in procs):
            raise SystemExit("a sweep failed; run the same command again to resume")
    rows = collect(root, seeds)
    ort_rows = ort_ptq(root, args.calib_samples)
    previous = with_previous(rows, ort_rows, args.previous) if args.previous else None
    tm = json.loads((teacher / "metrics.json").read_text()) if (teacher / "metrics.json").is_file() else {}
    meta = {"previous": previous, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "int8_flags": cpu_flags(),
            "teacher_accuracy": tm.get("accuracy"), "teacher_seconds": tm.get("seconds"),
            "script_seconds_this_invocation": time.time() - started}
    # QAT step cost: median QAT epoch / median float epoch of the same run (same process, same data)
    meta["qat_over_float_epoch"] = {cell_id(r): round(r["phase_seconds"]["qat"]["median_epoch_s"]
                                                      / r["phase_seconds"]["float"]["median_epoch_s"], 2)
                                    for r in rows if {"float", "qat"} <= set(r.get("phase_seconds") or {})}
    cols = summarise(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "columns": cols, "cells": rows,
                                                           "ort_ptq": ort_rows}, indent=2))
    md = markdown(cols, ort_rows, meta)
    (RESULTS / f"{args.name}.md").write_text(md)
    plot(cols, RESULTS / f"{args.name}.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
