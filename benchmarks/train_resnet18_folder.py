"""A teacher trained outside edgekd, distilled by edgekd: torchvision's resnet18 trained with plain
PyTorch on an image folder (torchvision.datasets.ImageFolder, as a user would), saved with
``torch.save(model.state_dict())``, then given to edgekd as ``--teacher torchvision:resnet18=FILE`` and
distilled into a student under 100k parameters at 8 and 4 bits, exported and benched.

The training here reads the PNGs as RGB (ImageFolder's default loader) and normalizes each channel
with the same MEAN/STD; edgekd reads the grayscale PNGs as one channel and sums the stem's RGB
weights (models.weights), which computes exactly the same thing, so ``--normalize MEAN/STD`` is the
only thing to carry over. Writes benchmarks/results/resnet18_folder.json and .md: teacher accuracy
(plain PyTorch, and as edgekd measures it before distilling), student float and fake-quant accuracy,
runtime accuracy of the bundle (eval sample and whole test split), size and latency.

Usage (the tree from benchmarks/fmnist_to_png.py; the full run takes hours on 2 cores):
  python benchmarks/train_resnet18_folder.py --folder /tmp/fmnist-png --epochs 5 --distill-epochs 4
Tiny check (a few minutes):
  python benchmarks/train_resnet18_folder.py --folder T600 --epochs 1 --distill-epochs 1 --bits 8 \\
      --work /tmp/r18 --out /tmp/resnet18_tiny.json --force
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def train_teacher(folder: Path, out: Path, args) -> dict:
    """resnet18 with plain PyTorch (no edgekd): SGD + cosine, random horizontal flips."""
    import torch
    import torchvision
    from torchvision import transforms

    torch.manual_seed(args.seed)
    mean, std = args.mean_std
    norm = transforms.Normalize([mean] * 3, [std] * 3)
    train_set = torchvision.datasets.ImageFolder(folder / "train", transforms.Compose(
        [transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]))
    test_set = torchvision.datasets.ImageFolder(folder / "test", transforms.Compose([transforms.ToTensor(), norm]))
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=2)
    model = torchvision.models.resnet18(num_classes=len(train_set.classes))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * len(loader))
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        print(f"teacher epoch {epoch + 1}/{args.epochs} done ({time.perf_counter() - started:.0f}s)", flush=True)
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test_set, batch_size=256, num_workers=2):
            correct += int((model(x).argmax(1) == y).sum())
    torch.save(model.state_dict(), out)
    return {"accuracy_plain_pytorch": correct / len(test_set), "seconds": time.perf_counter() - started,
            "classes": train_set.classes, "file": str(out)}


def edgekd(*args: str) -> None:
    cmd = [sys.executable, "-m", "edgekd", *args]
    print("$ edgekd " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def distill_export_bench(folder: Path, teacher: Path, bits: int, work: Path, args) -> dict:
    mean, std = args.mean_std
    run, bundle, rows = work / f"run-w{bits}", work / f"bundle-w{bits}", work / f"bench-w{bits}.json"
    edgekd("distill", "--data", f"imagefolder:{folder}", "--teacher", f"torchvision:resnet18={teacher}",
           "--student", args.student, "--bits", str(bits), "--normalize", f"{mean}/{std}", "--augment", "flip",
           "--float-epochs", str(args.distill_epochs), "--epochs", str(args.distill_epochs), "--seed", str(args.seed),
           "--workers", "2", "--out", str(run), "--overwrite", "-q", *(["--force"] if args.force else []))
    edgekd("export", str(run), "--target", args.target, "--out", str(bundle), "--overwrite", "-q")
    edgekd("bench", str(bundle), "--json", str(rows), "--overwrite")
    metrics = json.loads((run / "metrics.json").read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    row = json.loads(rows.read_text())[0]
    return {"bits": f"W{manifest['weight_bits']}A{manifest['act_bits']}", "student": args.student,
            "student_params": metrics["student_params"], "teacher_accuracy_edgekd": metrics["teacher_accuracy"],
            "student_float_accuracy": metrics["student_float_accuracy"],
            "student_fake_quant_accuracy": metrics["student_accuracy"],
            "runtime_accuracy_sample": manifest["runtime_accuracy"], "eval_samples": manifest["eval_samples"],
            "runtime_accuracy_full": manifest["runtime_accuracy_full"], "test_samples": manifest["test_samples"],
            "parity_top1": manifest["parity"]["top1_agreement"], "size_mb": row["size_mb"],
            "p50_ms": (row.get("latency_ms") or {}).get("p50"), "distill_seconds": metrics["seconds"]}


def markdown(result: dict) -> str:
    t = result["teacher"]
    lines = [f"teacher: torchvision resnet18 trained with plain PyTorch, {100 * t['accuracy_plain_pytorch']:.2f}% "
             f"test accuracy ({t['seconds']:.0f}s)", "",
             "| bits | student | params | teacher % (edgekd) | float % | fake-quant % | runtime % (sample) | "
             "runtime % (whole test) | parity | size MB | p50 ms |", "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["students"]:
        lines.append(f"| {r['bits']} | {r['student']} | {r['student_params']:,} | {100 * r['teacher_accuracy_edgekd']:.2f} | "
                     f"{100 * r['student_float_accuracy']:.2f} | {100 * r['student_fake_quant_accuracy']:.2f} | "
                     f"{100 * r['runtime_accuracy_sample']:.2f} ({r['eval_samples']}) | "
                     f"{100 * r['runtime_accuracy_full']:.2f} ({r['test_samples']}) | {r['parity_top1']:.4f} | "
                     f"{r['size_mb']:.4f} | {r['p50_ms'] or 0:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, help="a resnet18 state_dict already trained (skips the training)")
    parser.add_argument("--epochs", type=int, default=5, help="teacher epochs (plain PyTorch)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--distill-epochs", type=int, default=4, help="float KD epochs, then as many QAT epochs")
    parser.add_argument("--student", default="cnnfc-student", help="a student under 100k parameters")
    parser.add_argument("--bits", default="8,4")
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--normalize", default="0.286/0.353", help="MEAN/STD of the training images (Fashion-MNIST's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="distill even if the teacher is near chance (tiny checks)")
    parser.add_argument("--work", type=Path, default=Path("runs/resnet18-folder"))
    parser.add_argument("--out", type=Path, default=RESULTS / "resnet18_folder.json")
    args = parser.parse_args()
    args.mean_std = tuple(float(v) for v in args.normalize.split("/"))
    args.work.mkdir(parents=True, exist_ok=True)
    if args.teacher:
        teacher = {"accuracy_plain_pytorch": None, "seconds": 0, "file": str(args.teacher)}
    else:
        teacher = train_teacher(args.folder, args.work / "resnet18.pth", args)
    students = [distill_export_bench(args.folder, Path(teacher["file"]), int(b), args.work, args)
                for b in args.bits.split(",")]
    result = {"teacher": teacher, "students": students,
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if teacher["accuracy_plain_pytorch"] is not None:
        table = markdown(result)
        args.out.with_suffix(".md").write_text(table)
        print(table)


if __name__ == "__main__":
    main()
