"""Atomic writes: readers (and concurrent writers) never see a half-written file or folder, and a crash never
leaves nothing where a complete copy was.

Every write goes to a temporary sibling, ``.NAME.tmp-PID-ID``, renamed over the target when complete. A file
rename replaces its target in one step. A folder cannot be renamed over a non-empty folder, so a forced replace
takes two renames, the old copy first moved aside to ``.NAME.old-PID-ID``. Like a git ref update, the old copy
stays findable until the new one is in place: if the writer dies between the renames, the next write restores
it (and then replaces it as asked) and the next read reports where it is. Siblings that a dead process left
(temporaries can be 100 MB each) are removed by the next write to the same target.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from surgeon.errors import SurgeonError, brief

log = logging.getLogger("surgeon")


def sibling(target: Path, what: str) -> Path:
    """A fresh temporary name next to ``target`` (same file system, so renames are atomic), tagged with our pid."""
    return target.parent / f".{target.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def siblings(target: Path, what: str) -> list[Path]:
    """Temporary siblings of ``target`` of one kind (``tmp`` or ``old``), oldest first."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.{what}-(\d+)-[0-9a-f]+$")
    dated = []
    for p in target.parent.glob(f".{glob.escape(target.name)}.{what}-*"):
        if pattern.match(p.name):
            try:
                dated.append((p.lstat().st_mtime, p))
            except FileNotFoundError:  # another writer renamed or removed it since the listing
                continue
    return [p for _, p in sorted(dated, key=lambda d: d[0])]


def _owner_alive(path: Path) -> bool:
    """Whether the process that made a sibling may still be writing it (ours, or a live pid)."""
    pid = int(path.name.rsplit("-", 2)[-2])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def interrupted_replace(target: str | os.PathLike) -> Path | None:
    """The previous copy of a missing ``target`` that an interrupted forced replace moved aside, if any."""
    target = Path(target)
    if target.exists() or not target.parent.is_dir():
        return None
    olds = [p for p in siblings(target, "old") if not _owner_alive(p)]
    return olds[-1] if olds else None


def recover(target: str | os.PathLike) -> None:
    """Undo what a crashed writer left next to ``target``: restore a copy moved aside (when the target is missing)
    and remove stale temporaries and replaced copies."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    old = interrupted_replace(target)
    if old is not None:
        os.replace(old, target)
        log.warning("restored %s from %s: an earlier overwrite of it was interrupted", target, old.name)
    for what in ("old", "tmp"):
        for stale in siblings(target, what):
            if not _owner_alive(stale):
                _remove(stale)


def missing_target_error(target: str | os.PathLike, what: str) -> SurgeonError | None:
    """The error for a read of a missing ``target`` whose previous copy an interrupted replace left aside."""
    old = interrupted_replace(target)
    if old is None:
        return None
    return SurgeonError(
        f"{what} {target} is missing: an overwrite of it was interrupted, the previous copy is {old}",
        f"rename it back (mv {old} {target}), or write {target} again (that restores it first)",
    )


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports a failed write


def os_error(e: BaseException) -> OSError | None:
    """The operating-system error behind a failed write: ``e`` itself, or the one a library wrapped in its own type."""
    if isinstance(e, OSError):
        return e
    found = _RUST_OS_ERROR.search(str(e))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full: free space in {parent}, or write somewhere else",
    errno.EDQUOT: "your disk quota is used up: free space in {parent}, or write somewhere else",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f): raise the limit or write less",
    errno.EROFS: "{parent} is on a read-only file system: write somewhere else",
    errno.EACCES: "{parent} is not writable: check its permissions, or write somewhere else",
}


def write_error(target: str | os.PathLike, e: OSError) -> SurgeonError:
    """One line for a write that failed, with a hint for its cause (full disk, file-size limit, permissions)."""
    target = Path(target)
    hint = _WRITE_HINTS.get(e.errno or 0, "check free space and permissions in {parent}")
    return SurgeonError(f"cannot write {target}: {e.strerror or brief(e)}", hint.format(parent=target.parent))


def check_not_link(out: str | os.PathLike) -> None:
    """One rule for every command: an output is never a symbolic link. Replacing the link would leave its target
    stale, writing through it would change a folder the command was not named; either surprises someone."""
    out = Path(out)
    if out.is_symlink():
        raise SurgeonError(
            f"output {out} is a symbolic link (to {os.readlink(out)})",
            f"give the folder it points to ({out.resolve()}) as the output, or remove the link",
        )


def check_apart(out: str | os.PathLike, what: str, *sources: object) -> None:
    """Refuse an output that is, contains or lies inside one of ``sources`` (the ``what`` a command reads; those
    that are not paths here, like presets or modules, are skipped): writing it would replace or change its input."""
    real_out = Path(os.path.realpath(out))
    for source in sources:
        if not isinstance(source, (str, os.PathLike)) or not Path(source).expanduser().exists():
            continue
        real = Path(os.path.realpath(Path(source).expanduser()))
        if real_out == real:
            how = "is"
        elif real in real_out.parents:
            how = "is inside"
        elif real_out in real.parents:
            how = "contains"
        else:
            continue
        raise SurgeonError(
            f"output {out} {how} the {what} {source}", "write the output somewhere else (nothing was written)"
        )


def replaceable(out: Path) -> bool:
    """Whether ``out`` can be written without replacing anything: absent (and creatable) or an empty folder.

    Refuses a path that exists and is not a folder, and a symbolic link."""
    check_not_link(out)
    if out.exists() and not out.is_dir():
        raise SurgeonError(f"output path {out} exists and is not a folder", "choose another --out")
    if not out.exists():
        check_creatable(out)
        return True
    return not any(out.iterdir())


@contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success it replaces ``final`` in one step, else it is removed."""
    final = Path(final)
    recover(final)
    tmp = sibling(final, "tmp")  # unique per writer, so concurrent writers never collide
    try:
        yield tmp
        os.replace(tmp, final)
    except Exception as e:
        cause = os_error(e)
        if cause is None:
            raise
        raise write_error(final, cause) from e
    finally:
        tmp.unlink(missing_ok=True)


def check_output(path: str | os.PathLike, force: bool) -> None:
    """Refuse to replace an existing file or non-empty folder unless ``force`` (an empty folder is fine), and an
    output that cannot be created."""
    path = Path(path)
    check_not_link(path)
    recover(path)  # a copy an interrupted replace moved aside counts as existing
    if path.exists() and not force and not (path.is_dir() and not any(path.iterdir())):
        raise SurgeonError(f"output {'folder ' if path.is_dir() else ''}{path} exists", "pass --force to overwrite")
    check_creatable(path)


def check_creatable(path: str | os.PathLike) -> None:
    """Refuse, before any work, an output under a file or in a folder this process cannot write."""
    path = Path(path)
    if path.exists():
        return
    parent = next(p for p in path.absolute().parents if p.exists())  # the root always exists
    if not parent.is_dir():
        raise SurgeonError(f"cannot create {path}: {parent} is a file", "choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SurgeonError(f"cannot create {path}: {parent} is not writable", "choose another output path")


@contextmanager
def atomic_folder(folder: str | os.PathLike, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``folder`` (an existing one only with ``force``),
    on failure it vanishes. The replaced copy is moved aside first and deleted only once the new one is in place."""
    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        recover(folder)
        tmp = sibling(folder, "tmp")
        tmp.mkdir()  # not mkdtemp: that makes the folder private (0700) and the rename would keep it so
    except OSError as e:
        raise write_error(folder, e) from e
    try:
        yield tmp
        if folder.exists() and force:
            old = sibling(folder, "old")
            os.replace(folder, old)
            os.replace(tmp, folder)  # a crash right before this leaves `old`, which recover() restores
            _remove(old)
        else:
            os.replace(tmp, folder)
    except Exception as e:
        cause = os_error(e)
        if cause is None:
            raise
        raise write_error(folder, cause) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
