"""Training data: KanjiVG strokes and glyphs (from the pip package ``kanjivg``) and folders of images.

``--data`` names either the built-in data set ``kanjivg`` or a folder. A folder serves its ``train/`` and
``validation/`` (or ``val/``) subfolders when it has them, the way Hugging Face's imagefolder does; otherwise the
whole folder is the training split and there is no validation split (``None``), rather than a held-out loss that
silently reuses training images. Every derived file goes to the user cache directory, never the repository.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from surgeon.data.splits import canonical_split
from surgeon.errors import SurgeonError

__all__ = ["BUILTIN", "canonical_split", "resolve_image_data", "resolve_sequence_data"]

BUILTIN = "kanjivg"
_FOLDER_NAMES = {"train": ("train",), "validation": ("validation", "val")}


def _folder_split(root: Path, split: str) -> Path | None:
    for name in _FOLDER_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    if split == "validation":
        return None
    if any((root / name).is_dir() for name in _FOLDER_NAMES["validation"]):
        raise SurgeonError(
            f"{root} has a validation folder but no train/ folder",
            "put the training images in train/ next to it, or pass a folder without splits",
        )
    return root


def resolve_image_data(
    spec: str, size: int, channels: int, split: str = "train", limit: int | None = None
) -> Dataset | None:
    """Images ``[channels, size, size]`` in [-1, 1] for ``spec`` = "kanjivg" (rendered glyphs) or a folder.

    A folder in the class-folder layout yields ``(image, label)`` items (see ``surgeon.data.images``); its
    validation split numbers its classes as the training split does.
    """
    split = canonical_split(split)
    if spec == BUILTIN:
        from surgeon.data.kanjivg import KanjiVGGlyphs

        return KanjiVGGlyphs(split, size=size, channels=channels, limit=limit)
    root = Path(spec).expanduser()
    if not root.exists():
        raise SurgeonError(
            f"no data set or folder named {spec!r}", f"pass --data {BUILTIN} or the path of a folder of images"
        )
    from surgeon.data.images import ImageFolder

    if not root.is_dir():
        return ImageFolder(root, size, channels)  # raises its "not a folder" error
    folder = _folder_split(root, split)
    if folder is None:
        return None
    if split == "validation":  # labels must mean the same classes as in training
        from surgeon.data.images import class_folders

        classes = class_folders(_folder_split(root, "train"))
        if classes is not None:
            return ImageFolder(folder, size, channels, limit=limit, classes=classes)
    return ImageFolder(folder, size, channels, limit=limit)


def resolve_sequence_data(
    spec: str, split: str = "train", limit: int | None = None, max_points: int | None = None
) -> Dataset:
    """Stroke sequences ``[L, 3]`` (x, y, pen) for ``spec`` = "kanjivg"; batch them with ``collate_sequences``."""
    split = canonical_split(split)
    if spec != BUILTIN:
        raise SurgeonError(f"unknown sequence data {spec!r}", f"sequence models train on --data {BUILTIN}")
    from surgeon.data.kanjivg import DEFAULT_MAX_POINTS, KanjiVGStrokes

    return KanjiVGStrokes(split, limit=limit, max_points=DEFAULT_MAX_POINTS if max_points is None else max_points)
