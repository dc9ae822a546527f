"""Atomic writes: readers (and concurrent writers) never see a half-written file or folder."""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SurgeonError


@contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success it replaces ``final`` in one step, else it is removed."""
    final = Path(final)
    # Same directory, so os.replace is a rename on one file system; unique per writer, so writers never collide.
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def check_output(path: str | os.PathLike, force: bool) -> None:
    """Refuse to replace an existing file or non-empty folder unless ``force`` (an empty folder is fine)."""
    path = Path(path)
    if path.exists() and not force and not (path.is_dir() and not any(path.iterdir())):
        raise SurgeonError(f"output {'folder ' if path.is_dir() else ''}{path} exists", "pass --force to overwrite")


@contextmanager
def atomic_folder(folder: str | os.PathLike, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``folder`` in one rename, on failure it vanishes."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(folder, "tmp")
    tmp.mkdir()  # not mkdtemp: that makes the folder private (0700) and the rename would keep it so
    try:
        yield tmp
        if folder.exists() and force:
            # a non-empty folder cannot be renamed over: move it aside first, drop it once the new one is in place
            old = _sibling(folder, "old")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sibling(folder: Path, what: str) -> Path:
    return folder.parent / f".{folder.name}.{what}-{uuid.uuid4().hex[:12]}"
