"""What does distillation cost per epoch, and what does it buy, for a quantized student?

``timing``: epoch time of KD+QAT with the teacher cache vs QAT alone (cross-entropy only), same
student, same data, same bits, in one process. Rounds alternate (A B, B A, ...) so that drift from
other processes hits both equally; each round trains one epoch from the same initial state.
Reported: median epoch seconds per variant, the spread (min..max), the median of the per-round
ratios KD/QAT (target <= 1.25), and the one-off cache build time. With ``--live`` a third variant
runs the teacher on every batch (no cache), for reference.

``accuracy``: test accuracy (fake-quant, PyTorch) of the student at the given bits for no KD and
each method, same budget (float epochs + QAT epochs, same teacher), over ``--seeds``: mean, spread
(min..max) and the gain over no KD; a gain within the seed spread is marked ``no``.

Usage (reduced budgets shown; each writes JSON to benchmarks/results/ and prints a table):
  python benchmarks/bench_kd.py timing --data fashion-mnist --train-limit 10000 --rounds 3
  python benchmarks/bench_kd.py accuracy --data fashion-mnist --bits 4 --train-limit 5000 \\
      --float-epochs 1 --epochs 1 --seeds 0 --methods none,hinton,dkd
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 1.25


def _data(spec: str, seed: int, limit: int | None):
    from edgekd.pipeline.distill import _limit
    from edgekd.data import load_dataset

    data = _limit(load_dataset(spec, seed=seed), limit)
    data.flip_augment = False  # deterministic inputs: the cache applies
    return data


def _teacher(spec: str | None, data, args):
    from edgekd import api, models

    if spec is None:
        return models.build_model(api.DEFAULT_TEACHER, data.num_classes, data.input_shape).eval(), "untrained cnn-teacher"
    opts = api.DistillOptions(data=args.data, teacher_epochs=args.teacher_epochs, progress=False)
    from edgekd.pipeline.teachers import resolve_teacher

    model, _, src = resolve_teacher(spec, data, opts, print)
    return model.eval(), src


def timing(args) -> dict:
    import torch

    from edgekd import models, quant, training as tr
    from edgekd.kd.features import Probe
    from edgekd.kd import Objective

    tr.set_threads()
    data = _data(args.data, args.seed, args.train_limit)
    teacher, teacher_src = _teacher(args.teacher, data, args)
    torch.manual_seed(args.seed)
    student = models.build_model(args.student, data.num_classes, data.input_shape)
    qmodel = quant.quantize(student, quant.QuantSpec(weight_bits=args.bits, act_bits=args.bits))
    cfg = tr.FitConfig(epochs=1, lr=5e-4, batch_size=args.batch_size, seed=args.seed, progress=False)
    kd = lambda: Objective.single(args.method)  # noqa: E731
    started = time.perf_counter()
    x, _ = tr.as_tensors(data.train)
    probe_objective = kd()
    probe_objective.setup(Probe(qmodel, teacher, x[:8]))
    cache = tr.build_teacher_cache(teacher, x, probe_objective.teacher_layers)
    cache_seconds = time.perf_counter() - started
    run_data = data
    if args.chunk:  # short interleaved rounds on the first CHUNK samples: drift hits both variants alike
        from edgekd.data import Split

        run_data = copy.copy(data)
        run_data.train = Split(data.train.x[:args.chunk], data.train.y[:args.chunk])
        run_data.val = Split(data.val.x[:256], data.val.y[:256])
    variants = {"qat": lambda m: tr.fit(m, run_data, cfg, Objective.single("none")),
                "kd+qat cached": lambda m: tr.fit(m, run_data, cfg, kd(), teacher, cache=cache)}
    if args.live:
        variants["kd+qat live"] = lambda m: tr.fit(m, run_data, cfg, kd(), teacher, cache=False)
    times = {k: [] for k in variants}
    for r in range(args.rounds):
        names = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in names:
            res = variants[name](copy.deepcopy(qmodel))
            seconds = res.history[0]["seconds"]
            times[name].append(seconds * len(data.train) / len(run_data.train) if args.chunk else seconds)
            print(f"round {r + 1} {name}: {times[name][-1]:.1f}s", flush=True)
    ratios = [k / q for k, q in zip(times["kd+qat cached"], times["qat"])]
    rows = [{"variant": k, "median_s": statistics.median(v), "min_s": min(v), "max_s": max(v),
             "ratio_to_qat": statistics.median(v) / statistics.median(times["qat"])} for k, v in times.items()]
    return {"benchmark": "kd_timing", "data": args.data, "train_samples": len(data.train), "student": args.student,
            "bits": args.bits, "method": args.method, "teacher": teacher_src, "batch_size": args.batch_size,
            "chunk": args.chunk, "note": "with --chunk, epoch seconds are projected: round seconds x train/chunk",
            "rounds": args.rounds, "cache_build_s": cache_seconds, "cache_mb": cache.nbytes / 2**20,
            "paired_ratio_median": statistics.median(ratios), "target": TARGET,
            "pass": statistics.median(ratios) <= TARGET, "rows": rows, "times": times, "environment": _env()}


def accuracy(args) -> dict:
    from edgekd import api

    results = []
    for method in args.methods.split(","):
        for seed in args.seeds:
            opts = api.DistillOptions(data=args.data, student=args.student, teacher=args.teacher, weight_bits=args.bits,
                                      act_bits=args.bits, method=method, epochs=args.epochs,
                                      float_epochs=args.float_epochs, teacher_epochs=args.teacher_epochs,
                                      batch_size=args.batch_size, seed=seed, progress=False, flip=args.flip,
                                      train_limit=args.train_limit)
            row = {"method": method, "seed": seed}
            run_dir = Path(args.runs) / f"{method}-s{seed}"
            try:
                if (run_dir / "metrics.json").is_file():  # finished earlier with the same runs dir: reuse
                    m = json.loads((run_dir / "metrics.json").read_text())
                else:
                    m = api.distill(opts, out=run_dir, log=lambda s: None)
                row |= {"status": "ok", "accuracy": m["student_accuracy"], "teacher_accuracy": m["teacher_accuracy"],
                        "float_accuracy": m["student_float_accuracy"], "seconds": m["seconds"]}
            except Exception as e:  # one failing method is one failed row
                row |= {"status": "error", "error": f"{type(e).__name__}: {e}"[:200]}
            print(json.dumps(row), flush=True)
            results.append(row)
            if args.partial:  # a run cut short still leaves its finished rows
                args.partial.write_text(json.dumps(_accuracy_report(args, results), indent=2, default=str) + "\n")
    return _accuracy_report(args, results)


def _accuracy_report(args, results: list[dict]) -> dict:
    return {"benchmark": "kd_accuracy", "data": args.data, "student": args.student, "bits": args.bits,
            "budget": {"train_limit": args.train_limit, "float_epochs": args.float_epochs, "epochs": args.epochs,
                       "teacher": args.teacher, "teacher_epochs": args.teacher_epochs, "batch_size": args.batch_size,
                       "flip": args.flip, "seeds": args.seeds},
            "summary": summarize(results), "runs": results, "environment": _env()}


def summarize(results: list[dict]) -> list[dict]:
    by = {}
    for r in results:
        if r["status"] == "ok":
            by.setdefault(r["method"], []).append(r["accuracy"])
    base = by.get("none")
    rows = []
    for method, accs in by.items():
        mean = statistics.mean(accs)
        spread = max(accs) - min(accs)
        row = {"method": method, "n": len(accs), "mean": mean, "min": min(accs), "max": max(accs), "spread": spread}
        if base and method != "none":
            gain = mean - statistics.mean(base)
            noise = max(spread, max(base) - min(base))
            row |= {"gain": gain, "gain_exceeds_spread": None if noise == 0 and len(accs) == 1 else gain > noise}
        rows.append(row)
    return rows


def _env() -> dict:
    import os

    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_avg": os.getloadavg()}


def render(report: dict) -> str:
    if report["benchmark"] == "kd_timing":
        lines = [f"{'variant':<16} {'median s/epoch':>15} {'min..max':>14} {'x QAT':>7}"]
        lines += [f"{r['variant']:<16} {r['median_s']:>15.1f} {r['min_s']:>6.1f}..{r['max_s']:<7.1f} {r['ratio_to_qat']:>7.2f}"
                  for r in report["rows"]]
        lines.append(f"paired ratio KD+QAT (cached) / QAT: {report['paired_ratio_median']:.2f} (target <= {TARGET}) "
                     f"-> {'PASS' if report['pass'] else 'FAIL'}; cache built once in {report['cache_build_s']:.1f}s "
                     f"({report['cache_mb']:.1f} MB fp16), {report['train_samples']} samples")
        return "\n".join(lines)
    lines = [f"{'method':<10} {'n':>2} {'mean acc':>9} {'min..max':>15} {'gain':>8} {'gain > spread':>14}"]
    for r in report["summary"]:
        gain = f"{r['gain']:+.4f}" if "gain" in r else "-"
        beyond = {True: "yes", False: "no", None: "n/a (1 seed)"}.get(r.get("gain_exceeds_spread"), "-") if "gain" in r else "-"
        lines.append(f"{r['method']:<10} {r['n']:>2} {r['mean']:>9.4f} {r['min']:>7.4f}..{r['max']:<7.4f} {gain:>8} {beyond:>14}")
    errors = [r for r in report["runs"] if r["status"] != "ok"]
    lines += [f"error {r['method']} seed {r['seed']}: {r['error']}" for r in errors]
    lines.append(f"budget: {json.dumps(report['budget'])}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["timing", "accuracy"])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--student", default="cnnfc-student")
    p.add_argument("--teacher", default=None, help="checkpoint or architecture (timing default: an untrained "
                                                     "cnn-teacher, same cost as a trained one)")
    p.add_argument("--teacher-epochs", type=int, default=20)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=None, help="first N training samples only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="timing: alternating rounds of one epoch each")
    p.add_argument("--method", default="hinton", help="timing: the KD method")
    p.add_argument("--chunk", type=int, default=None, help="timing: rounds train on the first CHUNK samples "
                                                           "(val: 256) and project to an epoch; more, shorter rounds")
    p.add_argument("--live", action="store_true", help="timing: also time KD with the teacher run on every batch")
    p.add_argument("--methods", default="none,hinton,kd,mse,dkd,tfkd,fitnet,at,rkd,fsp", help="accuracy: methods")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=8, help="accuracy: QAT epochs")
    p.add_argument("--float-epochs", type=int, default=8, help="accuracy: float KD epochs before QAT")
    p.add_argument("--flip", action="store_true", help="accuracy: random flips (the teacher cache holds both orientations)")
    p.add_argument("--runs", default="runs/bench_kd", help="accuracy: where the run directories go")
    p.add_argument("--json", type=Path, help="output JSON (default benchmarks/results/bench_kd_<what>.json)")
    args = p.parse_args(argv)
    out = args.json or RESULTS / f"bench_kd_{args.what}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    args.partial = out
    report = timing(args) if args.what == "timing" else accuracy(args)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(render(report))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
