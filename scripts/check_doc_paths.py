"""Check that every ``easier.X.Y`` and repository path named in README.md and docs/*.md exists.

A dotted name is imported module by module, then resolved attribute by attribute
(``easier.merge.LatencyConfig`` imports ``easier.merge`` and reads ``LatencyConfig``). A path
in backticks that looks like a repository file (``src/...``, ``tests/x.py``, ``docs/x.md``,
``bench/...``, ``scripts/...``) must exist. Prints each failure; exit 1 if any.

    PYTHONPATH=src python scripts/check_doc_paths.py
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOTTED = re.compile(r"(?<![\w./-])easier(?:\.[A-Za-z_]\w*)+")
FILE = re.compile(r"`((?:src|tests|docs|bench|scripts|\.ci)/[\w./-]+?)(?:::\w+)?`")
GLOB = re.compile(r"[*{]")


def resolve(name: str) -> str | None:
    """None when ``name`` imports/resolves, else why not."""
    parts = name.split(".")
    obj, i = None, 1
    for i in range(len(parts), 0, -1):  # the longest importable module prefix
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError:
            continue
    if obj is None:
        return "no such module"
    for attr in parts[i:]:
        if not hasattr(obj, attr):
            return f"{'.'.join(parts[:i])} has no {attr!r}"
        obj = getattr(obj, attr)
        i += 1
    return None


def docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main() -> int:
    failures = []
    for doc in docs():
        text = doc.read_text(encoding="utf-8")
        for name in sorted(set(DOTTED.findall(text))):
            name = name.rstrip(".")
            why = resolve(name)
            if why:
                failures.append(f"{doc.relative_to(ROOT)}: {name}: {why}")
        for path in sorted(set(FILE.findall(text))):
            if not GLOB.search(path) and not (ROOT / path).exists():
                failures.append(f"{doc.relative_to(ROOT)}: {path}: no such file")
    print("\n".join(failures) or f"ok: {len(docs())} documents")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
