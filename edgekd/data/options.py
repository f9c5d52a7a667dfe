"""How a dataset is read: the options every data spec takes (normalization) and those of image
folders (size, channels, augmentation, decoding workers, bad files).

``DataOptions`` travels with a run: ``record()`` is what the run's and the bundle's metadata keep
(``data_options``), so that ``export`` and ``quantize`` read the test split exactly as training
did; ``workers`` and ``image_cache`` are left out (they change how fast, not what).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields

from ..core.errors import ConfigError

HOW_FAST = ("workers", "image_cache")  # change how fast the data is read, not what: not recorded
FOLDER_ONLY = ("image_size", "channels", "skip_bad_images")  # meaningless for arrays held in memory
MAX_IMAGE_SIZE = 4096  # --image-size: one 4096 x 4096 RGB sample is 200 MB as float32 already
WORKERS_PER_CPU = 4  # --workers: at most this many decoding processes per CPU (8 at least)


def max_workers() -> int:
    return max(8, WORKERS_PER_CPU * (os.cpu_count() or 1))


@dataclass
class DataOptions:
    normalize: str = "auto"  # auto (train-split statistics) | imagenet | none | MEAN/STD
    image_size: int | None = None  # folders: resize + centre crop to N x N (None: the images' own size)
    channels: int | None = None  # folders: 1 or 3 (None: from the data)
    augment: str | None = None  # crop+flip | flip | none (None: the dataset's default)
    workers: int = 2  # folders: DataLoader worker processes decoding images
    skip_bad_images: bool = False  # folders: skip and count unreadable images instead of stopping
    image_cache: str = "auto"  # folders: the decoded-image cache, auto | on | off (data.decoded)

    def check_bounds(self) -> None:
        """Sizes that would exhaust the machine before the first image: an --image-size whose samples
        do not fit in memory, more --workers processes than the CPUs could ever keep busy."""
        size = self.image_size
        if isinstance(size, int) and not isinstance(size, bool) and size > MAX_IMAGE_SIZE:
            raise ConfigError(f"--image-size {size} is larger than {MAX_IMAGE_SIZE} (one {size} x {size} image "
                              f"would take {3 * 4 * size * size / 2**30:.1f} GiB as float32)",
                              f"pass --image-size {MAX_IMAGE_SIZE} or less")
        workers, most = self.workers, max_workers()
        if isinstance(workers, int) and not isinstance(workers, bool) and workers > most:
            raise ConfigError(f"--workers {workers} is more than {most} ({WORKERS_PER_CPU} decoding processes per "
                              f"CPU, {os.cpu_count() or 1} CPUs here)", f"pass --workers {most} or less")

    def record(self) -> dict:
        """What the run's metadata keeps (everything that decides the pixels the model sees)."""
        return {k: v for k, v in asdict(self).items() if k not in HOW_FAST}

    @classmethod
    def from_record(cls, record, workers: int = 0) -> "DataOptions":
        """The options a run recorded (``record()``); a run of an earlier version has none: defaults."""
        if not isinstance(record, dict):
            return cls(workers=workers)
        known = {f.name for f in fields(cls)} - set(HOW_FAST)
        return cls(**{k: v for k, v in record.items() if k in known}, workers=workers)

    def folder_options(self):
        """The image folder's own options (data.imagefolder.FolderOptions)."""
        from .imagefolder import FolderOptions

        return FolderOptions(image_size=self.image_size, channels=self.channels,
                             augment=self.augment or "crop+flip", workers=self.workers,
                             skip_bad_images=self.skip_bad_images, image_cache=self.image_cache)

    def check_in_memory(self, spec: str) -> bool | None:
        """For a dataset held in memory: refuse the folder-only options; the flips ``augment`` asks for
        (None: the dataset's default)."""
        for name in FOLDER_ONLY:
            if getattr(self, name) not in (None, False):
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} applies to image folders (--data imagefolder:DIR), not to {spec}",
                                  f"leave out {flag}")
        if self.augment == "crop+flip":
            raise ConfigError(f"--augment crop+flip applies to image folders, not to {spec} (its images are "
                              "already cropped)", "use --augment flip or --augment none")
        return None if self.augment is None else self.augment == "flip"


def data_options(opts) -> DataOptions:
    """The DataOptions of a TrainOptions / DistillOptions (fields of the same names)."""
    return DataOptions(**{f.name: getattr(opts, f.name) for f in fields(DataOptions) if hasattr(opts, f.name)})

