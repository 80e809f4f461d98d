"""Write docs/cli.md's option tables from ``build_parser()``, so they cannot drift from the code.

Each subcommand's options go between ``<!-- cli:NAME:begin -->`` and ``<!-- cli:NAME:end -->``
in docs/cli.md: option, default (as argparse holds it, or "—" for none) and help text.

    python scripts/cli_reference.py            # rewrite the tables in docs/cli.md
    python scripts/cli_reference.py --check    # exit 1 if they are out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from easier.cli.parser import build_parser

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def default_of(action: argparse.Action) -> str:
    """The default as a user would type it; '—' where the option has none."""
    d = False if action.default is argparse.SUPPRESS else action.default  # --debug after CMD
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off" if d is False else "on"
    if isinstance(action, argparse.BooleanOptionalAction):
        return "on" if d else "off"
    if d is None or d == []:
        return "—"
    return f"`{d}`"


def table(sub: argparse.ArgumentParser) -> str:
    rows = ["| option | default | what it does |", "|---|---|---|"]
    for a in sub._actions:
        if isinstance(a, argparse._HelpAction) or a.help is argparse.SUPPRESS:
            continue
        name = " / ".join(f"`{s}`" for s in a.option_strings) or f"`{a.dest}` (positional)"
        if a.choices and not isinstance(a, argparse.BooleanOptionalAction):
            name += " {" + ",".join(map(str, a.choices)) + "}"
        dflt = "required" if not a.option_strings else default_of(a)
        rows.append(f"| {name} | {dflt} | {cell(a.help or '')} |")
    return "\n".join(rows)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def render(doc: str) -> str:
    for name, sub in subcommands().items():
        begin, end = f"<!-- cli:{name}:begin -->", f"<!-- cli:{name}:end -->"
        pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
        if not pattern.search(doc):
            sys.exit(f"{DOC}: no {begin} ... {end} markers")
        doc = pattern.sub(lambda _m, s=sub, b=begin, e=end: f"{b}\n{table(s)}\n{e}", doc)
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is out of date")
    args = ap.parse_args()
    doc = DOC.read_text()
    new = render(doc)
    if args.check:
        sys.exit(0 if new == doc else f"{DOC} is out of date: run python {sys.argv[0]}")
    DOC.write_text(new)


if __name__ == "__main__":
    main()
