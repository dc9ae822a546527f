"""Model folders are closed: nothing reached through a link that leads out of a folder is read or copied.

A downloaded folder can hold links anywhere (``scheduler/notes.txt -> ~/.ssh/id_rsa``); following one while
loading reads a file the folder does not own, and following one while copying (``export --pipeline``) puts that
file into an artifact the user then publishes. Every reader and copier of a model folder goes through
:func:`inside` (one file) or :func:`copy_folder` (a whole tree): each resolves the path, links included, and
refuses, naming it, one that resolves outside the folder; a link loop ends in an error instead of a hang.

Links that stay inside the folder are fine, and so is a folder that is itself reached through a link (the check
is against where the folder resolves to). A Hugging Face cache snapshot (``models--ORG--NAME/snapshots/REV``)
links its files into the repository's ``blobs/``: the repository folder is its boundary.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from surgeon.errors import SurgeonError

_HINT = "copy the file into the folder instead of linking to it, or remove the link"


def _real(path: Path, root: Path) -> Path:
    """Where ``path`` resolves to, every link followed; a loop or a dangling link is a one-line error."""
    try:
        return Path(os.path.realpath(path, strict=True))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SurgeonError(f"{path} in {root} is a symbolic link loop", _HINT) from None
        if isinstance(e, FileNotFoundError) and os.path.islink(path):
            raise SurgeonError(f"{path} in {root} is a link to nothing ({os.readlink(path)})", _HINT) from None
        raise


def boundary(root: str | os.PathLike) -> Path:
    """The resolved folder that files of ``root`` must stay in (a hub snapshot's: its repository folder)."""
    real = _real(Path(root), Path(root))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        return real.parent.parent
    return real


def inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` (in the folder ``root``) resolved; refused when it resolves outside ``root``."""
    root, path = Path(root), Path(path)
    limit, real = boundary(root), _real(path, root)
    if real != limit and limit not in real.parents:
        raise SurgeonError(
            f"{path} links outside the folder {root} (to {real}); nothing was read from it",
            _HINT,
        )
    return real


def check_folder(root: str | os.PathLike) -> None:
    """Refuse a folder any of whose entries (recursively) resolves outside it, or that holds a link loop."""
    for _ in _files(Path(root), Path(root), set()):
        pass


def _files(root: Path, path: Path, above: set[Path]) -> Iterator[tuple[Path, Path]]:
    """``(path, resolved)`` of ``path`` (a file) or of every regular file below it (a folder), each checked by
    :func:`inside`; ``above`` holds the resolved folders that lead to it, so a link back up is a loop."""
    real = inside(root, path)
    mode = real.stat().st_mode
    if stat.S_ISREG(mode):
        yield path, real
        return
    if not stat.S_ISDIR(mode):
        raise SurgeonError(f"{path} in {root} is not a regular file or folder", "remove it from the folder")
    if real in above:  # a link inside the folder that points at one of its own ancestors
        raise SurgeonError(f"{path} in {root} is a symbolic link loop", _HINT)
    for name in sorted(os.listdir(path)):
        yield from _files(root, path / name, above | {real})


def copy_folder(src: str | os.PathLike, dst: str | os.PathLike, skip: Iterable[str] = ()) -> None:
    """Copy the folder ``src`` into ``dst`` (created), files as plain copies, links inside it as what they point at;
    top-level names in ``skip`` and hidden ones are left out. Everything is checked before anything is copied."""
    src, dst, skip = Path(src), Path(dst), set(skip)
    top = {inside(src, src)}
    files = [
        pair
        for name in sorted(os.listdir(src))
        if name not in skip and not name.startswith(".")
        for pair in _files(src, src / name, top)
    ]
    dst.mkdir(parents=True, exist_ok=True)
    for path, target in files:
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(target, out)
