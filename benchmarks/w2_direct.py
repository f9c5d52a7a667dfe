"""One QAT cell trained and exported directly through the Python API (how an earlier README's 87.05% /
87.80% W2A2 depthwise=W8A8 figures were made; those were on the bundle's 2,000-image eval sample, which
this script now prints as ``runtime_sample``): Hinton KD from a float student made by bench_mixed.py
(``--float-from``, its float.pt), no float phase, then export for ``--target`` (ONNX Runtime accuracy on
the whole test split, parity against PyTorch). Prints one JSON line.

    OMP_NUM_THREADS=1 PYTHONPATH=.:benchmarks python benchmarks/w2_direct.py --float-from runs/mix/float.pt \\
        --epochs 8 --qat-lr 3e-3 --layer-bits depthwise=W8A8 --out runs/w2_direct
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    from bench_mobile import build

    from edgekd import api

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--float-from", required=True, help="float.pt of a bench_mixed.py run")
    p.add_argument("--model", default="mobile-student")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--layer-bits", action="append", default=[])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--qat-lr", type=float, default=3e-3)
    p.add_argument("--train-limit", type=int, default=0, help="0: every training image")
    p.add_argument("--target", default="onnxruntime-cpu")
    p.add_argument("--out", default="runs/w2_direct")
    args = p.parse_args()

    def loaded():
        model = build(args.model)
        model.load_state_dict(torch.load(args.float_from, weights_only=True)["state_dict"])
        return model

    opts = api.DistillOptions(data="fashion-mnist", method="hinton", weight_bits=args.bits, act_bits=args.bits,
                              layer_bits=args.layer_bits or None, float_epochs=0, epochs=args.epochs, lr=args.qat_lr,
                              qat_lr=args.qat_lr, train_limit=args.train_limit or None, seed=0, target=args.target,
                              progress=False)
    torch.manual_seed(0)
    t0 = time.time()
    m = api.distill(opts, out=Path(args.out) / "run", overwrite=True, student=loaded(), teacher=loaded().eval())
    manifest = api.export(m["run_dir"], args.target, out=Path(args.out) / "bundle", overwrite=True,
                          student=build(args.model))
    print(json.dumps({"fake_quant": m["student_accuracy"], "runtime": manifest["runtime_accuracy_full"],
                      "runtime_sample": manifest["runtime_accuracy"],
                      "parity": manifest["parity"]["top1_agreement"], "seconds": round(time.time() - t0),
                      "val": [r["val_accuracy"] for r in m["history"]]}))


if __name__ == "__main__":
    main()
