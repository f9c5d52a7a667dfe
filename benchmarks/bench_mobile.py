"""Mobile blocks at fp32 / W8A8 / W4A4 on Fashion-MNIST, at equal budgets (#13).

Two students with depthwise-separable convolutions, squeeze-excitation gates and Hardswish:
``mobile-student`` (defined here, about 23k parameters) and torchvision ``mobilenet_v3_small``
(random init, one input channel; about 1.5M parameters, large for 28x28 images on a small CPU).

Per model: the float student trains for ``--float-epochs`` with ``distill``'s float phase (QAT-only
method ``none``, no teacher: the rows measure quantization, not distillation); its weights
(``float.pt``) are the fp32 row and the start of every QAT cell, which all train ``--epochs`` at the
QAT learning rate ``distill`` uses after a float phase (``--qat-lr``; rows labelled before/after
were made with lr/4, row ``depthwise-lr`` with edgekd's default, which keeps lr for depthwise students). ``--label`` names the quantizer code
being measured: run once per code version (e.g. ``before`` with PYTHONPATH pointing at a worktree of
the previous commit, reusing the float students of the ``after`` run with ``--float-from``), and the
results accumulate in ``results/mobile.json`` / ``.md``.

    OMP_NUM_THREADS=1 python benchmarks/bench_mobile.py --label after --train-limit 6000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results"


class SqueezeExcite(nn.Module):
    """Global pool -> 1x1 reduce -> ReLU -> 1x1 expand -> Hardsigmoid gate -> x * gate."""

    def __init__(self, c: int):
        super().__init__()
        self.pool, self.fc1, self.relu = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, max(8, c // 4), 1), nn.ReLU()
        self.fc2, self.gate = nn.Conv2d(max(8, c // 4), c, 1), nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


def _block(cin: int, cout: int, stride: int, se: bool) -> nn.Sequential:
    """Depthwise 3x3 -> BN -> Hardswish -> [SE] -> pointwise 1x1 -> BN -> Hardswish."""
    return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                         nn.Hardswish(), SqueezeExcite(cin) if se else nn.Identity(),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.Hardswish())


def mobile_student(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Module:
    """Stride-2 stem, four depthwise-separable blocks (three with SE), global pool, linear head."""
    w = width
    return nn.Sequential(nn.Conv2d(in_channels, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.Hardswish(),
                         _block(w, 2 * w, 1, False), _block(2 * w, 4 * w, 2, True), _block(4 * w, 4 * w, 1, True),
                         _block(4 * w, 8 * w, 2, True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8 * w, num_classes))


def build(name: str) -> nn.Module:
    from edgekd import models

    return mobile_student() if name == "mobile-student" else models.build_model(name, 10, (1, 28, 28))


def _distill(args, name: str, bits: int, work: Path, float_from: Path | None) -> dict:
    from edgekd import api

    model = build(name)
    if float_from is not None:
        model.load_state_dict(torch.load(float_from, weights_only=True)["state_dict"])
    opts = api.DistillOptions(data=args.data, method="none", weight_bits=bits, act_bits=bits,
                              float_epochs=0 if float_from is not None else args.float_epochs, epochs=args.epochs,
                              lr=args.lr, qat_lr=args.qat_lr, train_limit=args.train_limit, seed=args.seed,
                              progress=False)
    out = work / f"{name.replace(':', '_')}-w{bits}a{bits}"
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(args.seed)
    return api.distill(opts, out=out, student=model)


def run_model(args, name: str, work: Path) -> dict:
    t0 = time.time()
    float_pt = Path(args.float_from) / f"{name.replace(':', '_')}.pt" if args.float_from else None
    row = {"model": name, "label": args.label, "params": sum(p.numel() for p in build(name).parameters()),
           "qat_lr": args.qat_lr if args.qat_lr else "edgekd default"}
    for bits in args.bits:
        m = _distill(args, name, bits, work, float_pt)
        if float_pt is None:  # the first cell trained the float student: every other cell starts from it
            float_pt = work / f"{name.replace(':', '_')}.pt"
            shutil.copy(Path(m["run_dir"]) / "float.pt", float_pt)
            row["fp32"] = m["student_float_accuracy"]
        row[f"W{bits}A{bits}"] = m["student_accuracy"]
        row[f"W{bits}A{bits}_qat_loss"] = [round(r["loss"], 4) for r in m["history"] if r["phase"] == "qat"]
    if "fp32" not in row:  # a student trained by an earlier run
        row["fp32"] = _float_accuracy(args, name, float_pt)
    row["seconds"] = round(time.time() - t0, 1)
    return row


def _float_accuracy(args, name: str, float_pt: Path) -> float:
    import numpy as np

    from edgekd.data import load_dataset

    model = build(name)
    model.load_state_dict(torch.load(float_pt, weights_only=True)["state_dict"])
    data = load_dataset(args.data, seed=args.seed)
    x = torch.as_tensor(data.test.take(np.arange(len(data.test)))).float()
    with torch.no_grad():
        pred = torch.cat([model.eval()(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)])
    return float((pred == torch.as_tensor(data.test.y)).float().mean())


def write(rows: list[dict], budget: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "mobile.json"
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    allrows = list(old)
    for row in rows:  # a later run of the same model and code adds its cells to the row (e.g. --bits 2)
        same = next((r for r in allrows if (r["model"], r["label"]) == (row["model"], row["label"])), None)
        if same is None:
            allrows.append(row)
        else:
            same.update({k: v for k, v in row.items() if k != "seconds"})
            same["seconds"] = same.get("seconds", 0) + row["seconds"]
    path.write_text(json.dumps({"budget": budget, "rows": allrows}, indent=1) + "\n")
    cells = [f"W{b}A{b}" for b in (8, 4, 2) if any(f"W{b}A{b}" in r for r in allrows)]
    lines = [f"Budget: {budget['text']}", "", "| model | params | quantizer | QAT lr | fp32 | " + " | ".join(cells)
             + " | seconds |", "|---|---|---|---|---|" + "---|" * len(cells) + "---|"]
    for r in allrows:
        acc = " | ".join(f"{r[c]:.2%}" if c in r else "-" for c in cells)
        qat_lr = r.get("qat_lr", budget.get("lr", 0) / 4)  # rows before the column: lr/4
        lines.append(f"| {r['model']} | {r['params']:,} | {r['label']} | {qat_lr} | {r['fp32']:.2%} | {acc} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "QAT loss per epoch: " + "; ".join(f"{r['model']} {r['label']} {c}: {r[c + '_qat_loss']}"
                                                     for r in allrows for c in cells if c + "_qat_loss" in r)]
    (RESULTS / "mobile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True, help="the quantizer code measured (before / after)")
    p.add_argument("--models", nargs="+", default=["mobile-student", "torchvision:mobilenet_v3_small"])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--train-limit", type=int, default=6000)
    p.add_argument("--float-epochs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=3, help="QAT epochs of every quantized cell")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--qat-lr", type=float, default=None,
                   help="QAT learning rate [default: edgekd's: lr/4 after the float phase, lr for students with "
                        "depthwise convolutions; runs labelled before/after used lr/4]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=lambda v: [int(b) for b in v.split(",")], default=[8, 4],
                   help="bit widths of the QAT cells (W=A), e.g. 8,4,2")
    p.add_argument("--float-from", help="folder of MODEL.pt float students written by an earlier run")
    p.add_argument("--work", default="runs/bench_mobile")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(args.work) / args.label
    work.mkdir(parents=True, exist_ok=True)
    budget = {"text": f"{args.data}, first {args.train_limit} training images, {args.float_epochs} float epochs "
                      f"(lr {args.lr}), {args.epochs} QAT epochs per cell (QAT lr: see the column), QAT only (no "
                      f"teacher), batch 64, seed {args.seed}, {torch.get_num_threads()} thread(s)",
              "train_limit": args.train_limit, "float_epochs": args.float_epochs, "epochs": args.epochs,
              "lr": args.lr, "data": args.data}
    rows = []
    for name in args.models:
        rows.append(run_model(args, name, work))
        print(json.dumps(rows[-1]), flush=True)
    write(rows, budget)


if __name__ == "__main__":
    main()
