"""Image folders: ``--data imagefolder:DIR`` with ``DIR/train/<class>/*`` and optional ``test/`` and ``val/``.

Images (PNG, JPEG, BMP, WebP, GIF, TIFF) are decoded to 8 bits per channel lazily, never all held in
memory. What a file gives, the same whether it is decoded every epoch or read from the cache (both
decode through ``Transform.decode``):

- the picture as a viewer shows it: an EXIF orientation (phone photos) is applied, also to the size
  the images must agree on;
- ``--channels 1``: PIL's luminance (L = 0.299 R + 0.587 G + 0.114 B); ``3``: RGB, a grey image repeated;
  CMYK through PIL's conversion (no colour profile); 1-bit images as 0 and 255;
- alpha (RGBA, LA, a palette's transparent colour) is dropped: the colour stored under each pixel is
  kept, as PIL's ``convert`` and torchvision's loader give it;
- 16-bit grayscale PNGs are scaled, v * 255 / 65535 rounded (the picture of its 8-bit version);
  32-bit float images (TIFF mode F) and integers beyond 16 bits have no agreed 8-bit scale and are
  unreadable images (an error, or skipped with --skip-bad-images);
- animated GIFs and WebPs: the first frame.

The channel count, when not given, is 1 only if every sampled image is grey (1-bit, L, LA, 16-bit).
Decoding happens once per split into the
decoded-image cache (data.decoded, ``--image-cache``) when it is on, then read memory-mapped; else one
sample at a time, by a DataLoader's worker processes in training. Classes are the sorted folder names of
``train/`` and must be the same in every split. Without ``val/`` (or ``test/``) a seeded,
stratified share of ``train/`` is held out, as for the other datasets.

Transforms: evaluation resizes the shorter side to ``image_size`` and crops the centre; training
takes a random resized crop (scale 0.35..1, aspect 3/4..4/3) and a horizontal flip (``augment``:
``crop+flip``, ``flip`` or ``none``). Without ``image_size`` all images must share one size and
none is resized. Random transforms draw from a generator seeded by (seed, epoch, sample index), so
a sample looks the same whatever the number of workers, and an interrupted run resumes exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError, EdgekdError, MissingFileError, WorkerFailure
from . import decoded
from .decoded import normalized
from .pixels import UnsupportedImage, eight_bit, is_gray, shown_size, upright  # noqa: F401
from .splits import split_indices

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
AUGMENTS = ("crop+flip", "flip", "none")
CROP_SCALE, CROP_RATIO = (0.35, 1.0), (3 / 4, 4 / 3)


@dataclass
class FolderOptions:
    """How an image folder is read (the CLI's --image-size, --channels, --augment, --workers, ...)."""

    image_size: int | None = None  # None: the images' own size (all must agree)
    channels: int | None = None  # None: from the data (1 if every image is grayscale, else 3)
    augment: str = "crop+flip"
    workers: int = 2
    skip_bad_images: bool = False
    image_cache: str = "auto"  # auto | on | off (data.decoded)


@dataclass
class Transform:
    """Decode + resize/crop (+ a random resized crop for training) + normalize, as numpy float32 CHW.
    Random flips are drawn by the batch source (training.batches), which needs to know them."""

    size: tuple[int, int]  # (H, W) of the output
    channels: int
    mean: list[float]
    std: list[float]
    resize: int | None = None  # shorter side before the centre crop (None: as stored)
    augment: str = "none"

    def __call__(self, path: str, rng: np.random.Generator | None = None) -> np.ndarray:
        return normalized(self.decode(path, rng), self.mean, self.std)

    def decode(self, path: str, rng: np.random.Generator | None = None) -> np.ndarray:
        """The file's pixels through this geometry (``rng``: a random resized crop), uint8 (C, H, W)."""
        from PIL import Image

        with Image.open(path) as im:
            return self.pixels(upright(im), rng, path)

    def pixels(self, im, rng: np.random.Generator | None = None, path: str = "") -> np.ndarray:
        """An open PIL image through this geometry, uint8 (C, H, W)."""
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")  # the same colours; PIL warns when a palette's transparency is dropped
        im = eight_bit(im).convert("L" if self.channels == 1 else "RGB")
        if rng is not None and self.augment == "crop+flip":
            im = _random_resized_crop(im, self.size, rng)
        elif self.resize is not None:
            im = _resize_center_crop(im, self.resize, self.size)
        elif im.size != (self.size[1], self.size[0]):
            raise ConfigError(f"{path} is {im.size[0]}x{im.size[1]}, the others {self.size[1]}x{self.size[0]}",
                              "pass --image-size N to resize every image")
        a = np.asarray(im, dtype=np.uint8)
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    def geometry(self) -> dict:
        """What decides the pixels before normalization (the decoded-image cache's key)."""
        return {"size": list(self.size), "channels": self.channels, "resize": self.resize}

    def describe(self) -> dict:
        return {"resize_shorter_side": self.resize, "center_crop": list(self.size), "channels": self.channels,
                "scale": "1/255", "normalize": {"mean": self.mean, "std": self.std}}


def _resize_center_crop(im, shorter: int, size: tuple[int, int]):
    from PIL import Image

    w, h = im.size
    scale = shorter / min(w, h)
    im = im.resize((max(size[1], round(w * scale)), max(size[0], round(h * scale))), Image.BILINEAR)
    left, top = (im.size[0] - size[1]) // 2, (im.size[1] - size[0]) // 2
    return im.crop((left, top, left + size[1], top + size[0]))


def _random_resized_crop(im, size: tuple[int, int], rng: np.random.Generator):
    """torchvision's RandomResizedCrop: an area share in CROP_SCALE and an aspect in CROP_RATIO (log-uniform),
    ten tries, then the centre crop of the whole image; the crop is resized to ``size``."""
    from PIL import Image

    w, h = im.size
    for _ in range(10):
        area = w * h * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return im.resize((size[1], size[0]), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    return _resize_center_crop(im, min(size), size)


@dataclass
class FolderSplit:
    """One split of an image folder: the files and their labels; images are decoded on demand, or read
    from the decoded-image cache (data.decoded) once ``prepare`` has made or found it."""

    files: list[str]
    y: np.ndarray  # int64 (N,)
    transform: Transform | None = None  # set once the normalization is known
    train_transform: Transform | None = None
    skip_bad: bool = False
    bad: set = field(default_factory=set)  # files that failed to decode (with skip_bad)
    cache_mode: str = "auto"  # --image-cache
    cache: decoded.DecodedImages | None = None  # this split's pixels, row i = file i
    note: str | None = None  # why there is no cache (after prepare)

    lazy = True
    workers: int = 0  # DataLoader worker processes that decode this split

    def __len__(self) -> int:
        return len(self.y)

    @property
    def crops(self) -> bool:
        """Training takes random crops (the teacher's inputs are not known in advance)."""
        return self.train_transform is not None and self.train_transform.augment == "crop+flip"

    def subset(self, idx) -> "FolderSplit":
        idx = np.asarray(idx, dtype=np.int64)
        part = FolderSplit([self.files[i] for i in idx], self.y[idx], self.transform, self.train_transform,
                           self.skip_bad, self.bad, self.cache_mode)
        if self.cache is not None:
            part.cache = decoded.DecodedImages(self.cache.path, self.cache.shape, self.cache.ok, rows=self.cache.rows[idx])
        part.workers = self.workers
        return part

    def prepare(self) -> bool:
        """Find or make this split's decoded-image cache (``--image-cache``); True when the split is cached.
        Unreadable files stop here (or are counted, with --skip-bad-images)."""
        if self.cache is not None or self.note is not None:
            return self.cache is not None
        t = self.transform
        shape = (len(self.files), t.channels, *t.size)
        self.note = decoded.why_not(self.cache_mode, int(np.prod(shape)), decoded.cache_dir())
        if self.note is not None:
            return False
        key = decoded.cache_key(self.files, t.geometry())
        self.cache = decoded.open_or_build(key, shape, _Decode(self.files, t, self.skip_bad), self.workers)
        for row in np.flatnonzero(~self.cache.ok):
            self._unreadable(int(row), None)
        return True

    def cache_line(self, crops: bool = False) -> str:
        """One log line: where this split's images come from (after prepare)."""
        if self.cache is None:
            return f"decoded-image cache off ({self.note}): images decoded every epoch"
        how = "random crops taken from it" if crops else "read memory-mapped"
        if crops and self.train_transform.resize is not None:
            how = "training decodes the files for its random resized crops (--augment flip reads the cache)"
        again = f", rebuilt: {self.cache.rebuilt}" if self.cache.rebuilt else ""
        return f"decoded-image cache {self.cache.path} ({self.cache.nbytes / 2**20:.1f} MB{again}): {how}"

    def load(self, i: int, rng: np.random.Generator | None = None) -> np.ndarray | None:
        """Sample ``i`` through the eval transform (``rng``: the training one); None for a bad file
        that is skipped."""
        transform = self.train_transform if rng is not None else self.transform
        crop = rng is not None and transform.augment == "crop+flip"
        if self.cache is not None and (not crop or transform.resize is None):
            if not self.cache.ok[self.cache.rows[i]]:
                return self._unreadable(i, None)
            pixels = self.cache.array[self.cache.rows[i]]
            if crop:  # the cache holds the images as stored: crop them as if decoded
                pixels = transform.pixels(_as_image(pixels), rng, self.files[i])
            return normalized(pixels, transform.mean, transform.std)
        try:
            return transform(self.files[i], rng)
        except EdgekdError:
            raise
        except MemoryError:  # the machine's limit, not the file's fault: never skipped as a bad image
            raise ConfigError(*out_of_memory(self.files[i], transform)) from None
        except Exception as e:  # PIL's UnidentifiedImageError, OSError (truncated), ...
            return self._unreadable(i, e)

    def _unreadable(self, i: int, e: Exception | None) -> None:
        if not self.skip_bad:
            raise ConfigError(*unreadable(self.files[i], e)) from None
        self.bad.add(self.files[i])
        return None

    def take(self, idx) -> np.ndarray:
        """The eval-transformed images at ``idx`` (a bad, skipped file gives zeros), float32 NCHW."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.cache is not None:
            rows = self.cache.rows[idx]
            x = normalized(self.cache.array[rows], self.transform.mean, self.transform.std)
            x[~self.cache.ok[rows]] = 0.0
            return x
        images = [self.load(int(i)) for i in idx]
        shape = (self.transform.channels, *self.transform.size)
        return np.stack([a if a is not None else np.zeros(shape, np.float32) for a in images])

    def readable(self, idx) -> np.ndarray:
        """Which of ``idx`` can be read (a cached split knows without decoding; others: all)."""
        idx = np.asarray(idx, dtype=np.int64)
        return self.cache.ok[self.cache.rows[idx]] if self.cache is not None else np.ones(len(idx), bool)

    @property
    def x(self):
        raise AttributeError("an image-folder split is decoded lazily; use take(idx) or a loader")


class _Decode:
    """Row i of a split's files -> its uint8 pixels, None when unreadable and skipped, or the error's
    WorkerFailure (raised by the main process)."""

    def __init__(self, files: list[str], transform: Transform, skip_bad: bool):
        self.files, self.transform, self.skip_bad = files, transform, skip_bad

    def __call__(self, i: int):
        try:
            return WorkerFailure.catching(lambda: self.transform.decode(self.files[i]))
        except MemoryError:
            return WorkerFailure(*out_of_memory(self.files[i], self.transform))
        except Exception as e:
            if self.skip_bad:
                return None
            return WorkerFailure(*unreadable(self.files[i], e))


def unreadable(path: str, e: Exception | None) -> tuple[str, str]:
    """The (message, hint) of an image that cannot be decoded."""
    why = f"{type(e).__name__}: {e}" if e is not None else "it could not be decoded"
    return f"cannot read image {path}: {why}", "remove or fix the file, or pass --skip-bad-images"


def out_of_memory(path: str, transform: Transform) -> tuple[str, str]:
    """The (message, hint) when decoding ``path`` ran out of memory."""
    h, w = transform.size
    return (f"out of memory decoding image {path} to {transform.channels} x {h} x {w}",
            "pass a smaller --image-size, or fewer --workers")


def _as_image(pixels: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)))


def scan(root: Path) -> tuple[list[str], dict[str, tuple[list[str], np.ndarray]]]:
    """Class names and, per split present (train, val, test), its files and labels."""
    if not root.is_dir():
        raise MissingFileError(f"image folder not found: {root}", "pass --data imagefolder:DIR with DIR/train/<class>/")
    if not (root / "train").is_dir():
        raise ConfigError(f"{root} has no train/ folder", "lay images out as DIR/train/<class>/*.png (test/ and val/ "
                          "optional)")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ConfigError(f"{root / 'train'} holds {len(classes)} class folder(s)", "a classifier needs at least 2 classes")
    splits = {}
    for name in ("train", "val", "test"):
        if (root / name).is_dir():
            splits[name] = _scan_split(root / name, classes)
    return classes, splits


def _scan_split(folder: Path, classes: list[str]) -> tuple[list[str], np.ndarray]:
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
    if missing or extra:
        what = "; ".join(part for part in (f"missing {', '.join(missing)}" if missing else "",
                                          f"extra {', '.join(extra)}" if extra else "") if part)
        raise ConfigError(f"the classes of {folder} differ from train/'s: {what}",
                          "every split needs the same class folders")
    files, labels = [], []
    for label, name in enumerate(classes):
        images = sorted(str(p) for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not images:
            raise ConfigError(f"class folder {folder / name} holds no images ({', '.join(IMAGE_EXTS)})",
                              "add images or remove the folder from every split")
        files += images
        labels += [label] * len(images)
    return files, np.asarray(labels, dtype=np.int64)


def probe(files: list[str], options: FolderOptions) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) of the data: 1 channel only if every sampled image is grayscale."""
    from PIL import Image

    step = max(1, len(files) // 200)
    modes, sizes = set(), set()
    for path in files[::step]:
        try:
            with Image.open(path) as im:
                modes.add(im.mode)
                sizes.add(shown_size(im))
        except Exception:
            continue  # reported when decoded (or skipped with --skip-bad-images)
    gray = all(is_gray(m) for m in modes)
    channels = options.channels or (1 if gray and modes else 3)
    if options.image_size:
        return channels, (options.image_size, options.image_size)
    if len(sizes) > 1:
        raise ConfigError(f"the images have {len(sizes)} different sizes (e.g. {', '.join(f'{w}x{h}' for w, h in sorted(sizes)[:3])})",
                          "pass --image-size N to resize and centre-crop them to N x N")
    (w, h), = sizes or {(0, 0)}
    return channels, (h, w)


def channel_stats(split: FolderSplit, samples: int = 2000, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a seeded sample of up to ``samples`` images (eval transform,
    scaled to [0, 1], before normalization)."""
    idx = np.random.default_rng(seed).permutation(len(split))[:samples]
    total = count = 0
    sq = 0
    for i in idx:
        a = split.load(int(i))
        if a is None:
            continue
        a = a.astype(np.float64)
        total, sq, count = total + a.sum(axis=(1, 2)), sq + (a ** 2).sum(axis=(1, 2)), count + a[0].size
    if not count:
        raise ConfigError(f"none of the {len(idx)} training images sampled for the normalization could be read",
                          "check the image files, or pass --normalize MEAN/STD")
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean ** 2, 0.0))
    return [round(float(m), 6) for m in mean], [round(float(max(s, 1e-6)), 6) for s in std]


def load_imagefolder(root: Path, seed: int, options: FolderOptions, normalize: str = "auto",
                     val_fraction: float = 0.1, test_fraction: float = 0.2):
    """A Dataset whose splits are FolderSplits (see the module docstring)."""
    from .builtin import Dataset
    from .normalize import resolve_normalization

    if options.augment not in AUGMENTS:
        raise ConfigError(f"--augment must be one of {', '.join(AUGMENTS)}, got {options.augment!r}")
    classes, found = scan(root)
    files, y = found["train"]
    split = FolderSplit(files, y, skip_bad=options.skip_bad_images)
    if "test" in found:
        test = FolderSplit(*found["test"], skip_bad=options.skip_bad_images)
    else:
        keep, held = split_indices(y, test_fraction, seed)
        split, test = split.subset(keep), split.subset(held)
    if "val" in found:
        val = FolderSplit(*found["val"], skip_bad=options.skip_bad_images)
    else:
        keep, held = split_indices(split.y, val_fraction, seed + 1)
        split, val = split.subset(keep), split.subset(held)
    for name, part in (("training", split), ("validation", val), ("test", test)):
        if not len(part):
            raise ConfigError(f"image folder {root}: the {name} split is empty ({len(y)} images in train/)",
                              "add images (a held-out split takes a share of every class), or add val/ and test/")
    channels, size = probe(split.files, options)
    plain = Transform(size, channels, [0.0] * channels, [1.0] * channels, options.image_size)
    split.transform = plain
    mean, std = resolve_normalization(normalize, channels, lambda: channel_stats(split, seed=seed))
    eval_t = Transform(size, channels, mean, std, options.image_size)
    train_t = Transform(size, channels, mean, std, options.image_size, options.augment)
    for s in (split, val, test):
        s.transform, s.train_transform, s.workers = eval_t, train_t, options.workers
        s.cache_mode = decoded.check_mode(options.image_cache)
    meta = {"input_shape": [channels, *size], "transform": eval_t.describe(), "augment": options.augment,
            "root": str(root), "files": {"train": len(split), "val": len(val), "test": len(test)}}
    return Dataset(f"imagefolder:{root}", split, val, test, classes, mean, std,
                   flip_augment=options.augment != "none", meta=meta)
