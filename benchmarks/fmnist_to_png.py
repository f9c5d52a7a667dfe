"""Write Fashion-MNIST as an image-folder tree of PNG files, from its four IDX files.

    DIR/train/<k>-<class>/<index>.png   (60,000 files; --limit N keeps the first N)
    DIR/test/<k>-<class>/<index>.png    (10,000 files; --test-limit N)

Class folders are named ``<label>-<name>`` (``0-T-shirt_top`` ... ``9-Ankle_boot``) so that their sorted
order, which ``--data imagefolder:DIR`` uses, is the label order of ``--data fashion-mnist``; file
names are the zero-padded IDX index, so a class's files sort in IDX order and the seeded validation
split held out of train/ picks the same images as the in-memory dataset's. Grayscale 8-bit PNG, 28x28.

Usage:
  python benchmarks/fmnist_to_png.py --out /tmp/fmnist-png                # all 70,000 images
  python benchmarks/fmnist_to_png.py --out /tmp/fmnist-png-6k --limit 6000
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np


def class_folders() -> list[str]:
    from edgekd.data import FASHION_CLASSES

    return [f"{k}-{re.sub(r'[^A-Za-z0-9]+', '_', name)}" for k, name in enumerate(FASHION_CLASSES)]


def write_split(images: np.ndarray, labels: np.ndarray, out: Path, limit: int | None) -> int:
    from PIL import Image

    folders = class_folders()
    for name in folders:
        (out / name).mkdir(parents=True, exist_ok=True)
    n = len(labels) if limit is None else min(limit, len(labels))
    width = len(str(len(labels)))
    for i in range(n):
        Image.fromarray(images[i]).save(out / folders[int(labels[i])] / f"{i:0{width}d}.png", optimize=False)
    return n


def main() -> None:
    from edgekd.data import FASHION_MNIST_DIR, read_idx

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=FASHION_MNIST_DIR, help="folder with the four IDX files")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None, help="training images to write (the first N)")
    parser.add_argument("--test-limit", type=int, default=None, help="test images to write (the first N)")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty")
    started = time.perf_counter()
    counts = {}
    for prefix, split, limit in (("train", "train", args.limit), ("t10k", "test", args.test_limit)):
        images = read_idx(_idx(args.src, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_idx(args.src, f"{prefix}-labels-idx1-ubyte"))
        counts[split] = write_split(images, labels, args.out / split, limit)
    print(f"wrote {counts['train']} training and {counts['test']} test PNGs under {args.out} "
          f"in {time.perf_counter() - started:.0f}s")


def _idx(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise SystemExit(f"{stem}[.gz] not found in {directory}")


if __name__ == "__main__":
    main()
