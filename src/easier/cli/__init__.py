"""Command line: ``easier reduce | compare | entropy | fold | models | datasets | methods``.

A thin layer: arguments are parsed into the library's calls; nothing here is needed from Python.
``parser`` builds the arguments, ``session`` turns them into data, models and settings,
``commands`` runs each command and ``failures`` turns an exception into one line.
"""

from __future__ import annotations

import contextlib
import sys
import traceback

from .failures import describe_failure
from .parser import build_parser

__all__ = ["build_parser", "describe_failure", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 1 runtime error, 2 bad option)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("easier: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, the traceback only under --debug
        message, code = describe_failure(exc)
        if args.debug:
            traceback.print_exc()
        print(f"easier: error: {message}", file=sys.stderr)
        return code
    finally:
        from ..distributed import cleanup

        with contextlib.suppress(Exception):  # a group broken by a dead rank may not close
            cleanup()


if __name__ == "__main__":
    sys.exit(main())
