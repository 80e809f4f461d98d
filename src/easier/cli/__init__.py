"""Command line: ``easier reduce | compare | entropy | fold | models | datasets | methods``.

A thin layer: arguments are parsed into the library's calls; nothing here is needed from Python.
``parser`` builds the arguments, ``session`` turns them into data, models and settings,
``commands`` runs each command and ``failures`` turns an exception into one line.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import traceback
from collections.abc import Iterator

from easier.cli.failures import describe_failure
from easier.cli.parser import build_parser

__all__ = ["build_parser", "describe_failure", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 1 runtime error, 2 bad option)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        with _sigterm_interrupts():
            return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        how, code = ("terminated (SIGTERM)", 143) if isinstance(exc, Terminated) else (
            "interrupted", 130)
        print(f"easier: {how}; every saved file is intact: rerun the same command with --resume "
              "to continue from the last completed iteration", file=sys.stderr)
        return code
    except Exception as exc:  # one line, the traceback only under --debug
        message, code = describe_failure(exc)
        if args.debug:
            traceback.print_exc()
        print(f"easier: error: {message}", file=sys.stderr)
        return code
    finally:
        from easier.parallel import cleanup

        with contextlib.suppress(Exception):  # a group broken by a dead rank may not close
            cleanup()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every write in flight is undone the same way."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM (kill, a scheduler's stop, torchrun's shutdown) into :class:`Terminated`
    for the command: temporaries are removed and the message says how to resume. Only where
    SIGTERM has its default action (a host program's own handler is left alone)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
