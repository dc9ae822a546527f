"""A folder of images as a training set: every readable image below it, resized, centre-cropped, in [-1, 1].

Class folders (``root/<class>/...``, torchvision's ImageFolder layout) give labels: when no image sits directly
in ``root`` and images sit in its subfolders, each first-level subfolder is a class, labels are the sorted folder
names numbered 0..K-1, and items are ``(image, label)`` pairs instead of bare images.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from surgeon.errors import SurgeonError, brief

log = logging.getLogger("surgeon")

__all__ = ["COMMON_EXTENSIONS", "ImageFolder", "class_folders", "image_extensions"]

COMMON_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_MODES = {1: "L", 3: "RGB"}


def image_extensions() -> frozenset[str]:
    """File extensions Pillow can open here (the common ones plus whatever plugins are installed)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN) | set(
        COMMON_EXTENSIONS
    )


def _image_files(root: Path) -> list[Path]:
    extensions = image_extensions()
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file())


def _class_of(root: Path, file: Path) -> str | None:
    """The first-level subfolder ``file`` lies in, or None for a file directly in ``root``."""
    parts = file.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def _classes(root: Path, files: list[Path]) -> list[str] | None:
    # folders whose name starts with "." (.ipynb_checkpoints, ...) are never classes
    names = [_class_of(root, p) for p in files]
    known = [n for n in names if n is not None]
    if not names or len(known) < len(names):
        return None
    classes = sorted({n for n in known if not n.startswith(".")})
    return classes or None


def class_folders(root: str | os.PathLike) -> list[str] | None:
    """Sorted class names if ``root`` has the class-folder layout (no image directly in it, images in subfolders)."""
    root = Path(root).expanduser()
    return _classes(root, _image_files(root)) if root.is_dir() else None


# what Pillow raises on a damaged, hostile or unsupported file (SyntaxError on some bad headers; a decompression
# bomb, an image claiming billions of pixels, is refused before it is decoded)
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
_WIDE = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit (and 32-bit integer) gray: scaled to 8 bits, not clipped


def _unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image, or None. verify() checks the file's structure without decoding
    pixels: a broken file is skipped here, at start-up, instead of crashing a training run hours later."""
    try:
        with Image.open(path) as im:
            if im.mode == "F" or im.mode.startswith("BGR"):
                return f"its pixel mode {im.mode} is not supported"
            im.verify()
        return None
    except DECODE_ERRORS as e:
        return brief(e)


def _to_mode(im: Image.Image, mode: str) -> Image.Image:
    """Convert to ``mode``; transparent images are flattened onto white, as an image viewer would show them, and
    16-bit ones are scaled to 8 bits (Pillow's own conversion would clip them, mostly to white)."""
    if im.mode in _WIDE:
        wide = np.asarray(im, dtype=np.float64) / 257.0
        im = Image.fromarray(np.clip(np.rint(wide), 0, 255).astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im.convert(mode)


class ImageFolder(Dataset):
    """Every readable image file below ``path`` (recursively) as float ``[channels, size, size]`` in [-1, 1].

    The shorter side is resized to ``size`` and the centre cropped; channels 1 → grayscale, 3 → RGB. Files that
    are not images (or are unreadable) are skipped. Order is the sorted relative path; with ``limit``, the first
    ``limit`` files of a shuffle seeded by ``seed`` are used (so a small subset still spans the folder).

    In the class-folder layout (module docstring) items are ``(image, label)``; ``classes`` lists the class names
    (``None`` for a folder without classes). Pass ``classes`` to number the folders as another split does (a
    validation split uses the training split's classes); its folders must then be among them.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        size: int,
        channels: int = 3,
        *,
        limit: int | None = None,
        seed: int = 0,
        classes: list[str] | None = None,
    ):
        root = Path(path).expanduser()
        if not root.exists():
            raise SurgeonError(f"image folder {root} does not exist", "check the path passed as --data")
        if not root.is_dir():
            raise SurgeonError(f"{root} is not a folder", "pass a folder that contains image files")
        if channels not in _MODES:
            raise SurgeonError(f"images can have 1 or 3 channels, got {channels}", "use 1 (grayscale) or 3 (RGB)")
        if size < 1:
            raise SurgeonError(f"image size must be positive, got {size}", "try 64")
        if limit is not None and limit < 1:
            raise SurgeonError(
                f"limit must be a positive number of images, got {limit}", "leave it unset to use every image"
            )
        self.root, self.size, self.channels = root, size, channels
        candidates = _image_files(root)
        found = _classes(root, candidates)
        if classes is not None:
            classes = list(classes)
            if found is None:
                raise SurgeonError(
                    f"{root} has no class folders, but the training images are sorted into {len(classes)} classes",
                    f"put its images in class folders ({', '.join(classes[:3])}"
                    f"{', ...' if len(classes) > 3 else ''}) as in the training split",
                )
            unknown = [c for c in found if c not in classes]
            if unknown:
                raise SurgeonError(
                    f"{root} has class folder {unknown[0]!r}, which the training split does not have",
                    "use the same class folder names in every split",
                )
        else:
            classes = found
        if classes is not None:  # files in hidden folders (not classes) are left out
            candidates = [p for p in candidates if _class_of(root, p) in classes]
        self.classes: list[str] | None = classes
        if limit is not None:
            candidates = random.Random(seed).sample(candidates, len(candidates))
        files: list[Path] = []
        skipped: list[tuple[Path, str]] = []
        for p in candidates:
            if limit is not None and len(files) >= limit:
                break
            reason = _unreadable(p)
            if reason is None:
                files.append(p)
            else:
                skipped.append((p, reason))
        if skipped and files:  # one line, not one per file, and never silent
            first, why = skipped[0]
            log.warning(
                "warning: skipped %d of %d image files in %s that cannot be read (e.g. %s: %s)",
                len(skipped),
                len(files) + len(skipped),
                root,
                first.relative_to(root),
                why,
            )
        if not files and skipped:
            first, why = skipped[0]
            raise SurgeonError(
                f"no images found in {root}: all {len(skipped)} image files were skipped "
                f"(e.g. {first.relative_to(root)}: {why})",
                "replace the damaged files, or convert them to 8-bit PNG or JPEG",
            )
        if not files:
            raise SurgeonError(
                f"no images found in {root}",
                f"images are read from files ending in {', '.join(COMMON_EXTENSIONS)} (or another format Pillow opens)",
            )
        self.files = files
        index = {c: k for k, c in enumerate(classes or ())}
        self.labels: list[int] | None = [index[_class_of(root, p)] for p in files] if classes is not None else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, int]:
        image = self.image(i)
        return image if self.labels is None else (image, self.labels[i])

    def image(self, i: int) -> torch.Tensor:
        """The ``i``-th image alone, ``[channels, size, size]`` in [-1, 1], whether or not the folder has classes."""
        try:
            return self._decode(self.files[i])
        except DECODE_ERRORS as e:  # damage that verify() cannot see (a truncated JPEG): the file is named
            raise SurgeonError(
                f"cannot decode image {self.files[i]}: {brief(e)}",
                "remove or replace that file, then continue the run with --resume",
            ) from None

    def _decode(self, file: Path) -> torch.Tensor:
        with Image.open(file) as im:
            im = ImageOps.exif_transpose(im)  # phone photos store their rotation in EXIF
            im = _to_mode(im, _MODES[self.channels])
            scale = self.size / min(im.size)
            w, h = max(self.size, round(im.width * scale)), max(self.size, round(im.height * scale))
            im = im.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
            left, top = (w - self.size) // 2, (h - self.size) // 2
            im = im.crop((left, top, left + self.size, top + self.size))
            arr = np.asarray(im, dtype=np.float32)
        arr = arr[..., None] if arr.ndim == 2 else arr  # [H, W, C]
        return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()
