"""Image folders against arrays in memory: Fashion-MNIST read from a PNG tree (``--data imagefolder:DIR``)
against ``--data fashion-mnist`` (IDX files decoded into memory).

Each variant is one ``edgekd train`` in a fresh process (same seed, same architecture, same epochs,
``--augment flip`` so that both draw random horizontal flips and nothing else, and the same explicit
``--normalize`` so both see the same pixels). Variants: ``memory``; ``folder-2w`` (2 workers, the
decoded-image cache, data.decoded, made once before the runs in a fresh cache folder and timed);
``folder-2w-nocache`` (``--image-cache off``: every image decoded every epoch by the workers);
``folder-small-2w`` (a tree with 6,000 training images). Reported per variant: test accuracy,
seconds per epoch (the median of the run's epochs, from its metrics.json history; run at least 3
epochs so that the first one's warm-up does not count), and peak resident memory (``wait4``'s
ru_maxrss of the training process: the largest of it and its DataLoader workers). The comparison the
issue asks for:
- accuracy: folder - memory, in points, per seed and on average (target: within 0.3). The two read
  the same pixels but split train/ into training and validation images in another order (the
  folder lists files by class), so single runs differ by seed noise; --seeds 0,1,2 shows its size;
- epoch time: folder with 2 workers / memory, both measured in this run (target: at most 1.3x);
- peak RSS: folder with 6,000 vs 60,000 training images (target: under 1.5 GB, not growing).

Writes benchmarks/results/bench_folder.json and bench_folder.md.

Usage (the PNG trees from benchmarks/fmnist_to_png.py):
  python benchmarks/fmnist_to_png.py --out /tmp/fmnist-png
  python benchmarks/fmnist_to_png.py --out /tmp/fmnist-png-6k --limit 6000
  python benchmarks/bench_folder.py --folder /tmp/fmnist-png --small-folder /tmp/fmnist-png-6k --epochs 3 --seeds 0,1,2
Tiny check (a minute): trees written with --limit 600 --test-limit 200 and --limit 300 --test-limit 200, then
  python benchmarks/bench_folder.py --folder T600 --small-folder T300 --epochs 1 --variants folder-2w,folder-small-2w \
      --out /tmp/bench_folder_tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def normalization(spec: str) -> str:
    """MEAN/STD of Fashion-MNIST's training images scaled to [0, 1] (as the in-memory path computes
    it), so that both paths normalize identically."""
    from edgekd.data import load_dataset
    from edgekd.data.options import DataOptions

    data = load_dataset(spec, options=DataOptions(normalize="none"))
    return f"{float(data.train.x.mean()):.6f}/{float(data.train.x.std()):.6f}"


def decode_once(data: str, norm: str, workers: int) -> float:
    """Seconds to fill the decoded-image cache of every split of ``data`` (in a child process, as a run would)."""
    code = ("import sys; from edgekd.data import load_dataset; from edgekd.data.options import DataOptions; "
            f"d = load_dataset({data!r}, options=DataOptions(normalize={norm!r}, augment='flip', workers={workers})); "
            "sys.exit(0 if all(s.prepare() for s in (d.train, d.val, d.test)) else 1)")
    started = time.perf_counter()
    if subprocess.call([sys.executable, "-c", code]) != 0:
        raise SystemExit(f"the decoded-image cache of {data} was not made")
    return time.perf_counter() - started


def train_once(name: str, data: str, args, norm: str, workers: int, out_root: Path, seed: int,
               cache: str = "auto") -> dict:
    """One `edgekd train` in a child process; its metrics and peak RSS."""
    out = out_root / f"{name}-s{seed}"
    cmd = [sys.executable, "-m", "edgekd", "train", "--data", data, "--arch", args.arch, "--epochs", str(args.epochs),
           "--seed", str(seed), "--batch-size", str(args.batch_size), "--augment", "flip", "--normalize", norm,
           "--workers", str(workers), "--out", str(out), "-q"] + (["--image-cache", cache] if data.startswith("image") else [])
    started = time.perf_counter()
    child = subprocess.Popen(cmd)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{name}: {' '.join(cmd)} failed with exit code {child.returncode}")
    metrics = json.loads((out / "metrics.json").read_text())
    elapsed = [0.0] + [row["seconds"] for row in metrics["history"]]  # elapsed in the phase, per epoch
    epochs = [b - a for a, b in zip(elapsed, elapsed[1:])]
    return {"variant": name, "seed": seed, "data": data, "workers": workers, "image_cache": cache,
            "accuracy": metrics["accuracy"], "epoch_seconds": statistics.median(epochs), "epochs_seconds": epochs,
            "peak_rss_mb": usage.ru_maxrss / 1024,
            "wall_seconds": time.perf_counter() - started, "bad_images": metrics.get("bad_images", 0)}


def _mean(rows: list[dict], key: str) -> float | None:
    return statistics.mean(r[key] for r in rows) if rows else None


def compare(rows: list[dict]) -> dict:
    """Per seed and on average: folder (cached) - memory accuracy, epoch-time ratios side by side, peak RSS."""
    by = lambda v: [r for r in rows if r["variant"] == v]  # noqa: E731
    memory, folder, nocache, small = by("memory"), by("folder-2w"), by("folder-2w-nocache"), by("folder-small-2w")
    out = {}
    if memory and folder:
        pairs = [(m, f) for m in memory for f in folder if m["seed"] == f["seed"]]
        out["accuracy_diff_points_per_seed"] = {m["seed"]: 100 * (f["accuracy"] - m["accuracy"]) for m, f in pairs}
        out["accuracy_diff_points"] = statistics.mean(out["accuracy_diff_points_per_seed"].values())
        out["epoch_time_ratio"] = _mean(folder, "epoch_seconds") / _mean(memory, "epoch_seconds")
    if memory and nocache:
        out["epoch_time_ratio_nocache"] = _mean(nocache, "epoch_seconds") / _mean(memory, "epoch_seconds")
        pairs = [(m, f) for m in memory for f in nocache if m["seed"] == f["seed"]]
        out["accuracy_diff_points_nocache"] = statistics.mean(100 * (f["accuracy"] - m["accuracy"]) for m, f in pairs)
    if folder and small:
        out["peak_rss_small_mb"] = max(r["peak_rss_mb"] for r in small)
        out["peak_rss_full_mb"] = max(r["peak_rss_mb"] for r in folder)
        out["peak_rss_growth"] = out["peak_rss_full_mb"] / out["peak_rss_small_mb"]
    out["targets"] = {"accuracy_within_points": 0.3, "epoch_time_ratio_max": 1.3, "peak_rss_mb_max": 1500}
    return out


def markdown(rows: list[dict], summary: dict, args, decode_s: dict) -> str:
    lines = ["| variant | seed | data | workers | image cache | test acc % | s / epoch | peak RSS MB |",
             "|:---|---:|:---|---:|:---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['data']} | {r['workers']} | "
                     f"{r['image_cache'] if r['data'].startswith('image') else '-'} | {100 * r['accuracy']:.2f} | "
                     f"{r['epoch_seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    lines.append("")
    if "accuracy_diff_points" in summary:
        per = ", ".join(f"seed {k}: {v:+.2f}" for k, v in summary["accuracy_diff_points_per_seed"].items())
        lines.append(f"accuracy folder - memory: {summary['accuracy_diff_points']:+.2f} points on average ({per}); "
                     f"epoch time folder (2 workers, cached) / memory: {summary['epoch_time_ratio']:.2f}x")
    if "epoch_time_ratio_nocache" in summary:
        lines.append(f"without the cache (--image-cache off, every image decoded every epoch): "
                     f"{summary['epoch_time_ratio_nocache']:.2f}x the in-memory epoch, accuracy "
                     f"{summary['accuracy_diff_points_nocache']:+.2f} points")
    for data, seconds in decode_s.items():
        lines.append(f"decoding once into the cache, every split of {data}: {seconds:.1f} s (2 workers)")
    if "peak_rss_growth" in summary:
        lines.append(f"peak RSS of the training process: {summary['peak_rss_small_mb']:.0f} MB (small tree) vs "
                     f"{summary['peak_rss_full_mb']:.0f} MB (full tree), x{summary['peak_rss_growth']:.2f}")
    lines.append(f"setup: {args.arch}, {args.epochs} epochs, seeds {args.seeds}, batch {args.batch_size}, --augment "
                 f"flip, {os.cpu_count()} CPUs ({cpu_flags()}), python {platform.python_version()}")
    return "\n".join(lines) + "\n"


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "int8 flags unknown"
    found = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in flags]
    return "int8 flags: " + (" ".join(found) or "none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True, help="the PNG tree of all of Fashion-MNIST")
    parser.add_argument("--small-folder", type=Path, help="a PNG tree with fewer training images (peak RSS)")
    parser.add_argument("--memory", default="fashion-mnist", help="the in-memory spec to compare with")
    parser.add_argument("--arch", default="cnn-student")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", default="0", help="seeds of the memory and folder-2w runs (comma-separated)")
    parser.add_argument("--variants", default="memory,folder-2w,folder-2w-nocache,folder-small-2w",
                        help="which runs (memory, folder-2w, folder-2w-nocache, folder-0w, folder-small-2w); the "
                             "nocache and small variants run with the first seed only")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_folder.json")
    args = parser.parse_args()
    norm = normalization(args.memory)
    wanted, seeds = args.variants.split(","), [int(s) for s in args.seeds.split(",")]
    rows, decode_s = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-folder-") as tmp:
        os.environ["EDGEKD_CACHE_DIR"] = str(Path(tmp) / "cache")  # a fresh cache: its making is timed below
        variants = {"memory": (args.memory, 0, "auto"), "folder-2w": (f"imagefolder:{args.folder}", 2, "auto"),
                    "folder-2w-nocache": (f"imagefolder:{args.folder}", 2, "off"),
                    "folder-0w": (f"imagefolder:{args.folder}", 0, "auto")}
        if args.small_folder:
            variants["folder-small-2w"] = (f"imagefolder:{args.small_folder}", 2, "auto")
        plan = [(name, seed) for seed in seeds for name in wanted if name in variants
                and (seed == seeds[0] or name in ("memory", "folder-2w"))]
        for name, seed in plan:
            data, workers, cache = variants[name]
            if data.startswith("imagefolder:") and cache != "off" and data not in decode_s:
                decode_s[data] = decode_once(data, norm, 2)
                print(f"decoded {data} into the cache in {decode_s[data]:.1f} s", flush=True)
            print(f"{name} seed {seed}: training on {data} ({workers} workers, image cache {cache}) ...", flush=True)
            rows.append(train_once(name, data, args, norm, workers, Path(tmp), seed, cache))
            print(f"  accuracy {rows[-1]['accuracy']:.4f}, {rows[-1]['epoch_seconds']:.1f} s/epoch, "
                  f"peak RSS {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
    summary = compare(rows)
    result = {"rows": rows, "summary": summary, "normalize": norm, "decode_once_seconds": decode_s,
              "cpu": cpu_flags(), "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(rows, summary, args, decode_s)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
