"""Output folders that are never half-written and never replace what the user did not ask to replace.

- `folder_lock(path)`: an inter-process file lock (`.<name>.lock` next to `path`), so two runs on one cache
  take turns; on a file system without `flock` (some NFS / Lustre / FUSE mounts) it falls back to a lock file
  that exists while it is held, and says so.
- `refuse_non_empty(path, ...)`: a non-empty target is refused unless it is ours to replace or the caller
  passed `overwrite`.
- `temporary_sibling(path)`: a fresh folder next to `path` (same file system), removed if anything fails.
- `move_into_place(tmp, path)`: the complete new folder replaces the old one by renames; the old one is
  deleted only once the new one is in place.
- `write_text_atomic(path, text)`: a temporary file renamed over `path` (readers see old or new, never half).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, SoftFileLock, Timeout

logger = logging.getLogger(__name__)


# flock errors that mean "this file system has no flock" (not "someone else holds it")
_NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP}


def _acquire(lock: FileLock | SoftFileLock, path: Path, lock_path: Path) -> None:
    try:
        lock.acquire(timeout=0)
    except Timeout:
        how = (
            f"if no other process is running, {lock_path} was left by a killed one: delete it"
            if isinstance(lock, SoftFileLock)
            else f"lock {lock_path}"
        )
        logger.info("Waiting for another process working on %s (%s)", path, how)
        lock.acquire()


def _flock_lock(lock_path: Path, path: Path) -> FileLock | SoftFileLock:
    """An acquired `FileLock` (flock), or an acquired `SoftFileLock` where the file system has no flock."""
    lock = FileLock(str(lock_path))
    try:
        _acquire(lock, path, lock_path)
        return lock
    except NotImplementedError:  # filelock < 3.30 on a file system without flock
        pass
    except OSError as err:
        if err.errno not in _NO_FLOCK:
            raise
    logger.warning(
        "The file system of %s has no flock (file locks); using the lock file %s instead, which exists while a "
        "process holds it. Only processes that see this folder take turns; if one is killed, delete %s before "
        "the next run (or put the folder (cache_dir / --output_dir) on a local disk).",
        path,
        lock_path,
        lock_path,
    )
    soft = SoftFileLock(str(lock_path.with_name(lock_path.name + ".soft")))
    _acquire(soft, path, Path(soft.lock_file))
    return soft


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike) -> Iterator[None]:
    """Holds the inter-process lock `.<name>.lock` next to `path` (its folder is created); logs when it waits.

    Where the file system has no `flock` (`NotImplementedError` from older filelock, or `ENOSYS` / `ENOLCK` /
    `ENOTSUP`), a `SoftFileLock` (`.<name>.lock.soft`, present while held) takes its place, with a warning
    naming the folder and what to do with a lock file left by a killed process.

    Args:
        path (`str` or `os.PathLike`): the folder the lock protects.
    """
    path = Path(path)
    lock_path = path.parent / f".{path.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = _flock_lock(lock_path, path)
    try:
        yield
    finally:
        lock.release()


def refuse_non_empty(
    path: Path, overwrite: bool, what: str, flag: str, replaceable: Callable[[Path], bool] | None = None
) -> None:
    """Raises `FileExistsError` when `path` exists and is not an empty folder, unless `overwrite` is set or
    `replaceable(path)` says it is a previous output of ours.

    Args:
        path (`Path`): the target folder.
        overwrite (`bool`): the user asked to replace whatever is there.
        what (`str`): what would be written, for the message.
        flag (`str`): the option that allows the replacement, for the message.
        replaceable (`Callable[[Path], bool]`, *optional*): True for a folder that may be replaced unasked.
    """
    if overwrite or not os.path.lexists(path):
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    if path.is_dir() and replaceable is not None and replaceable(path):
        return
    kind = "a folder holding other files" if path.is_dir() else "an existing file"
    raise FileExistsError(
        f"{path} is {kind}; writing {what} there would replace them. Choose an empty or new folder, "
        f"or pass {flag} to replace its contents."
    )


@contextlib.contextmanager
def temporary_sibling(path: Path) -> Iterator[Path]:
    """A new empty folder `.<name>.tmp-*` next to `path`, deleted if the block raises (or leaves it behind).

    Args:
        path (`Path`): the final folder (its parent is created).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(tmp: Path, path: Path) -> None:
    """Renames the complete folder `tmp` to `path`; an old `path` is moved aside first and deleted after.

    Args:
        tmp (`Path`): the new, complete folder (a sibling of `path`).
        path (`Path`): the target.
    """
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, old / path.name)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old / path.name, path)  # put the old output back
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Writes `text` to a temporary file next to `path`, flushes it to disk and renames it over `path`.

    Args:
        path (`Path`): the file to (re)write.
        text (`str`): its new content (UTF-8).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
