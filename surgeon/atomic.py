"""Atomic file writes: readers (and concurrent writers) never see a half-written file."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
