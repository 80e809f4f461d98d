"""The writer lock of a run directory: one writer at a time, and never another's files.

:func:`lock_run_dir` flocks the directory itself (``fcntl.flock``): the kernel drops it when the
process dies, however it dies, and deleting or replacing a file inside cannot split it. The
holder's PID is written to ``.easier.lock`` by rename (a planted link there is replaced, never
followed). A non-empty directory that easier did not write is refused before anything is
written, and while the lock is held no write below the directory goes through a symbolic link
(:func:`easier.io.atomic.check_no_links`).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from easier.errors import ConfigError, EasierError, StateError
from easier.io.atomic import CHECKSUMS, LOCKS, remove_stale_temporaries, write_tmp_and_rename

try:  # POSIX; elsewhere run directories are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "lock_run_dir", "lock_run_dir_ranks"]

LOCK_FILE = ".easier.lock"


_MARKERS = (LOCK_FILE, CHECKSUMS)  # an easier directory holds one of these from its first write


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd) as f:
            return f"PID {int(f.read(32).split()[0])}"
    return "an unknown process"


def _refuse_foreign(d: Path) -> None:
    """A directory easier did not write (no lock file, no checksums.json) that holds files is
    the user's: writing a run into it would replace their summary.json or model.pt."""
    entries = sorted(os.listdir(d))
    if entries and not any(m in entries for m in _MARKERS):
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ConfigError(
            f"{d} already holds {len(entries)} file(s) that easier did not write ({shown}): "
            "it writes a run only into a new or empty directory, or one of its own runs. Choose "
            "another output directory (--out); nothing was written")


@contextlib.contextmanager
def lock_run_dir(path: str | Path) -> Iterator[Path]:
    """Hold the writer lock of run directory ``path`` (created if needed) for the block.

    The lock is ``fcntl.flock`` on the directory itself, so deleting or replacing a file
    cannot split it, and the kernel releases it when the process exits, however it dies (no
    stale lock survives a SIGKILL). A second writer is refused at once with a
    :class:`StateError` naming the holder's PID, which ``.easier.lock`` records (written by
    rename: a planted link there is replaced, never followed). An existing non-empty directory
    that is not easier's is refused (ConfigError) before anything is written. Once locked, the
    temporaries a killed writer left are removed. Re-entrant within one process.
    """
    d = Path(path)
    created = not d.exists()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file where the directory should be
        raise ConfigError(f"{d} is not a directory (a file is in the way): choose another "
                          "output directory (--out); nothing was written") from None
    key = os.path.realpath(d)
    if key in LOCKS:
        LOCKS[key][1] += 1
        try:
            yield d
        finally:
            LOCKS[key][1] -= 1
        return
    fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise StateError(
                    f"{d} is in use: another easier process ({_holder(d / LOCK_FILE)}) is "
                    "writing this run directory. Wait for it to finish (or stop it), or choose "
                    "another directory; nothing was written."
                ) from None
        if not created:
            _refuse_foreign(d)
        LOCKS[key] = [fd, 1]
        try:
            pid = f"{os.getpid()}\n".encode()
            write_tmp_and_rename(d / LOCK_FILE, lambda f: f.write(pid))
            remove_stale_temporaries(d)
            yield d
        finally:
            del LOCKS[key]
            if created:
                _remove_if_unused(d)
    finally:
        os.close(fd)  # drops the flock


def _remove_if_unused(d: Path) -> None:
    """Remove a directory this lock created when nothing but the lock was written in it (the
    command failed before writing): a failed command leaves no empty run directory behind."""
    with contextlib.suppress(OSError):
        if os.listdir(d) == [LOCK_FILE]:
            (d / LOCK_FILE).unlink()
            d.rmdir()


@contextlib.contextmanager
def lock_run_dir_ranks(path: str | Path, info: Any) -> Iterator[None]:
    """:func:`lock_run_dir` for a job of ``info.world_size`` ranks: rank 0 takes the lock and
    every rank learns whether it got it, so a refusal stops the whole job at once."""
    from easier.parallel.collectives import any_failed

    with contextlib.ExitStack() as stack:
        failure: EasierError | None = None
        if info.is_main:
            try:
                stack.enter_context(lock_run_dir(path))
            except EasierError as exc:
                failure = exc
        if info.enabled and any_failed(failure is not None, info) and failure is None:
            raise StateError(f"rank 0 could not lock {path} (its log says why); stopping too")
        if failure is not None:
            raise failure
        yield
