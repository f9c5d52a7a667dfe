"""From an opened image file to the picture edgekd trains on, before any resizing: its orientation,
its bit depth, whether it is grey (the behaviour is listed in data.imagefolder's docstring)."""

from __future__ import annotations

import numpy as np

ORIENTATION = 0x0112  # the EXIF tag saying how a camera's picture is turned
_TURNED = (5, 6, 7, 8)  # orientations that swap width and height


class UnsupportedImage(ValueError):
    """Pixels edgekd cannot map to 8 bits without guessing (float images, integers above 16 bits)."""


def _orientation(im) -> int:
    try:
        return int(im.getexif().get(ORIENTATION, 1))
    except Exception:  # a damaged EXIF block: the picture as stored
        return 1


def upright(im):
    """The picture as a viewer shows it: a JPEG's (or TIFF's, WebP's) EXIF orientation applied."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(im) if _orientation(im) in range(2, 9) else im


def shown_size(im) -> tuple[int, int]:
    """(width, height) of ``upright(im)``, read from the header alone."""
    w, h = im.size
    return (h, w) if _orientation(im) in _TURNED else (w, h)


def is_gray(mode: str) -> bool:
    """Whether PIL ``mode`` holds one grey channel (with or without alpha): 1-bit, 8-, 16-bit, float."""
    return mode in ("1", "L", "LA", "La", "F") or mode.startswith("I")


def eight_bit(im):
    """A 16-bit grayscale image (PNG's ``I;16``, or mode ``I``, as older Pillow reads 16-bit PNGs) scaled to
    8 bits, v * 255 / 65535 rounded (PIL's convert would clip every value above 255); others as they are.
    A float image (mode ``F``, 32-bit TIFFs) or one with integers above 65535 has no agreed 8-bit
    version: UnsupportedImage, reported as an unreadable image."""
    from PIL import Image

    if im.mode == "F":
        raise UnsupportedImage(f"its pixels are 32-bit floats ({im.size[0]}x{im.size[1]}, mode F), which have no "
                               "agreed 8-bit scale; save it as an 8- or 16-bit image")
    if not im.mode.startswith("I"):
        return im
    a = np.asarray(im).astype(np.int64)
    if a.size and (a.max() > 65535 or a.min() < 0):
        raise UnsupportedImage(f"its pixels range over {a.min()}..{a.max()}, beyond 16 bits (mode {im.mode}); save "
                               "it as an 8- or 16-bit image")
    return Image.fromarray(np.clip((a * 255 + 32767) // 65535, 0, 255).astype(np.uint8), "L")
