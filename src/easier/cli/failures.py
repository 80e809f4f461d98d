"""One line and an exit code for any exception a command raises."""

from __future__ import annotations

import errno
import os

from easier.errors import ConfigError, EasierError

__all__ = ["describe_failure"]


def describe_failure(exc: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) of an error: 2 for a bad option, 1 for a runtime failure."""
    from easier.parallel import get_info, timed_out

    if isinstance(exc, ConfigError):
        return str(exc), 2
    if isinstance(exc, EasierError):
        return str(exc), 1
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS,
                                                  errno.EACCES, errno.EPERM, errno.EIO):
        where = f" {exc.filename}" if exc.filename else ""
        verb = "write" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else "access"
        return (f"cannot {verb}{where}: {os.strerror(exc.errno or 0)}. Nothing already saved was "
                "damaged (files are replaced atomically): fix that, then rerun the same command "
                "(`reduce`/`compare`: with --resume, to continue from the last saved "
                "iteration)"), 1
    info = get_info()
    if info.enabled and timed_out(exc):
        return (f"rank {info.rank}: no answer from the other ranks within the process-group "
                "timeout (--dist-timeout): a rank froze or died. The run directory holds the "
                "last completed iteration: rerun with --resume", 1)
    return (f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback; "
            "please report it)"), 1
