"""One line and an exit code for any exception a command raises.

Problems of the user's environment (a full disk, a quota, a file-size limit, a read-only or
forbidden directory, too little memory) and of the user's data (a dataset whose ``__len__``
promises more items than it has) say what to do; only what is left is "please report it".
"""

from __future__ import annotations

import errno
import os
import traceback

from easier.errors import ConfigError, EasierError

__all__ = ["describe_failure"]

_WRITE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
_ACCESS = (errno.EACCES, errno.EPERM, errno.EIO)
_FIX = {errno.EFBIG: " (a file-size limit: see `ulimit -f`, or the filesystem's largest file)",
        errno.EDQUOT: " (your disk quota)", errno.ENOSPC: " (free some space)"}
_ALLOC = ("can't allocate memory", "cannot allocate memory", "out of memory",
          "defaultcpuallocator", "bad_alloc")


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc).lower() for s in _ALLOC)


def _from_a_dataset(exc: BaseException) -> bool:
    """An IndexError raised while a DataLoader fetched items: the dataset's ``__len__`` says it
    has more items than ``__getitem__`` can give (the loader trusts ``__len__``)."""
    if not isinstance(exc, IndexError):
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    return any(f"utils{os.sep}data" in f.filename or f.name == "__getitem__" for f in frames)


def describe_failure(exc: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) of an error: 2 for a bad option, 1 for a runtime failure."""
    from easier.parallel import get_info, timed_out

    if isinstance(exc, ConfigError):
        return str(exc), 2
    if isinstance(exc, EasierError):
        return str(exc), 1
    if isinstance(exc, OSError) and exc.errno in (*_WRITE, *_ACCESS):
        where = f" {exc.filename}" if exc.filename else ""
        verb = "write" if exc.errno in _WRITE else "access"
        return (f"cannot {verb}{where}: {os.strerror(exc.errno or 0)}{_FIX.get(exc.errno, '')}. "
                "Nothing already saved was damaged (files are replaced atomically): fix that, "
                "then rerun the same command (`reduce`/`compare`: with --resume, to continue "
                "from the last saved iteration)"), 1
    if _out_of_memory(exc):
        return ("out of memory (" + (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                + "): use a smaller --batch-size or model, or free memory, then rerun "
                "(`reduce`/`compare`: with --resume, to continue from the last saved "
                "iteration)"), 1
    if _from_a_dataset(exc):
        return (f"the dataset raised IndexError ({exc}) for an item below its len(): its "
                "__len__ promises more items than __getitem__ can give; make them agree (your "
                "data; rerun with --debug for the traceback)"), 1
    info = get_info()
    if info.enabled and timed_out(exc):
        return (f"rank {info.rank}: no answer from the other ranks within the process-group "
                "timeout (--dist-timeout): a rank froze or died. The run directory holds the "
                "last completed iteration: rerun with --resume", 1)
    return (f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback; "
            "please report it)"), 1
