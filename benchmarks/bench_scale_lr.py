"""Quantizer scales at a fraction of the QAT lr (training/optim.SCALE_LR_FACTOR) against the lr itself,
side by side, on students and bit widths it was not measured on (it was chosen on one cell: the
mobile student at W2A2 with depthwise=W8A8, where scales at the lr diverged).

Per model: one float student (``--float-epochs`` on the first ``--train-limit`` training images, no
teacher), then for every width in ``--bits`` two QAT runs from it that differ only in the scales' lr
factor (``--factors``): Hinton KD from the float student, ``--epochs`` epochs at ``--qat-lr``, same seed
and batch order. Reports the fake-quant test accuracy on the whole test split (what ``distill`` measures;
the runtime is not involved: both runs export alike) and the validation accuracy per epoch.

    OMP_NUM_THREADS=1 PYTHONPATH=.:benchmarks python benchmarks/bench_scale_lr.py --models cnn-student,resnet-student
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def build(name: str):
    from bench_mobile import build as build_model

    return build_model(name)


def float_student(args, name: str, work: Path) -> Path:
    from edgekd import api

    torch.manual_seed(args.seed)
    opts = api.DistillOptions(data=args.data, method="none", weight_bits=8, act_bits=8, float_epochs=args.float_epochs,
                              epochs=1, lr=args.lr, train_limit=args.train_limit or None, seed=args.seed,
                              target=args.target, progress=False)
    m = api.distill(opts, out=work / "float" / "run", overwrite=True, student=build(name))
    shutil.copy(Path(m["run_dir"]) / "float.pt", work / "float.pt")
    return work / "float.pt"


def qat_cell(args, name: str, float_pt: Path, bits: int, factor: float, work: Path) -> dict:
    from edgekd import api
    from edgekd.training import optim

    def loaded():
        model = build(name)
        model.load_state_dict(torch.load(float_pt, weights_only=True)["state_dict"])
        return model

    opts = api.DistillOptions(data=args.data, method="hinton", weight_bits=bits, act_bits=bits, float_epochs=0,
                              epochs=args.epochs, lr=args.qat_lr, qat_lr=args.qat_lr,
                              train_limit=args.train_limit or None, seed=args.seed, target=args.target, progress=False)
    saved, optim.SCALE_LR_FACTOR = optim.SCALE_LR_FACTOR, factor
    try:
        torch.manual_seed(args.seed)
        m = api.distill(opts, out=work / f"W{bits}_f{factor:g}", overwrite=True, student=loaded(),
                        teacher=loaded().eval(), student_trained=True)
    finally:
        optim.SCALE_LR_FACTOR = saved
    return {"model": name, "bits": bits, "scale_lr_factor": factor, "fake_quant": m["student_accuracy"],
            "float": m["student_float_accuracy"],
            "val": [round(r["val_accuracy"], 4) for r in m["history"] if r["phase"] == "qat"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cnn-student,resnet-student,mobile-student")
    p.add_argument("--bits", default="8,4,2")
    p.add_argument("--factors", default="1,0.1")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--train-limit", type=int, default=10000, help="0: every training image")
    p.add_argument("--float-epochs", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--qat-lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", default="onnxruntime-cpu")
    p.add_argument("--work", default="runs/scale_lr")
    p.add_argument("--name", default="scale_lr")
    args = p.parse_args()
    flags = set(open("/proc/cpuinfo").read().split()) & {"avx2", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp"}
    rows = []
    for name in args.models.split(","):
        work = Path(args.work) / name.replace(":", "_")
        float_pt = float_student(args, name, work)
        for bits in (int(b) for b in args.bits.split(",")):
            for factor in (float(f) for f in args.factors.split(",")):
                rows.append(qat_cell(args, name, float_pt, bits, factor, work))
                print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"args": vars(args), "cpu": platform.processor() or platform.machine(), "cpu_flags": sorted(flags),
         "rows": rows}, indent=1) + "\n")
    lines = ["| model | W/A bits | float | scales at the lr | scales at lr x 0.1 | val by epoch (lr / lr x 0.1) |",
             "|---|---|---:|---:|---:|---|"]
    for name in args.models.split(","):
        for bits in sorted({r["bits"] for r in rows if r["model"] == name}, reverse=True):
            cell = {r["scale_lr_factor"]: r for r in rows if r["model"] == name and r["bits"] == bits}
            acc = lambda f: f"{cell[f]['fake_quant']:.2%}" if f in cell else "-"  # noqa: E731
            val = " / ".join(" ".join(f"{v:.3f}" for v in cell[f]["val"]) for f in sorted(cell, reverse=True))
            lines.append(f"| {name} | {bits} | {next(iter(cell.values()))['float']:.2%} | {acc(1.0)} | {acc(0.1)} | {val} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
