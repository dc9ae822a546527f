"""One writer per output: an exclusive advisory lock, held while a run, an evaluation, an export or a save writes.

The lock is ``fcntl.flock`` on ``.NAME.lock`` next to the output (beside, not inside: an output folder is
replaced whole by :mod:`surgeon.io.atomic`, which would take a lock file inside along with it). The operating
system releases it when the holder exits, however it exits, so a SIGKILLed run can be resumed at once; the
holder writes its pid into the file, and a second writer is refused with that pid. Within one process the lock
is re-entrant for the thread that holds it (``export`` writes through ``save``'s writer) and refuses other
threads, like another process.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from surgeon.errors import SurgeonError

_held: dict[Path, tuple[int, int, int]] = {}  # lock file → (thread id, depth, fd)
_guard = threading.Lock()


def lock_file(target: str | os.PathLike) -> Path:
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}.lock"


def _owner(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


def _refuse(target: Path, who: str) -> SurgeonError:
    return SurgeonError(
        f"{target} is being written by {who}", "wait for it to finish, or write to another output folder"
    )


@contextmanager
def exclusive(target: str | os.PathLike) -> Iterator[None]:
    """Hold the one-writer lock of ``target`` (a folder or file, existing or not) for the block."""
    target = Path(target)
    path = lock_file(target)
    me = threading.get_ident()
    with _guard:
        if path in _held:
            thread, depth, fd = _held[path]
            if thread != me:
                raise _refuse(target, f"another thread of this process ({os.getpid()})")
            _held[path] = (thread, depth + 1, fd)
            fd = -1  # re-entered: the outer block releases
        else:
            fd = _acquire(target, path)
            _held[path] = (me, 1, fd)
    try:
        yield
    finally:
        with _guard:
            thread, depth, held_fd = _held[path]
            if depth > 1:
                _held[path] = (thread, depth - 1, held_fd)
            else:
                del _held[path]
                _release(path, held_fd)


def _acquire(target: Path, path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SurgeonError(f"cannot create {path.parent}: {e.strerror}", "choose another output path") from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SurgeonError(
                f"cannot lock {target}: {e.strerror} ({path})", f"check permissions in {path.parent}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refuse(target, _owner(path)) from None
        # the previous holder may have removed the file between our open and our lock: then ours is a stale
        # inode nobody else sees, and the lock must be taken again on the file that is there now
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _release(path: Path, fd: int) -> None:
    try:
        path.unlink(missing_ok=True)  # while still locked, so no one else can be holding this inode
    finally:
        os.close(fd)
