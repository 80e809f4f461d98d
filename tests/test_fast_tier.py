"""The fast tier (``pytest -m "not slow"``) still reaches every module of src/easier.

Static and cheap: from the imports of each test file that has at least one non-slow test, follow
what those names need. ``from easier import fold`` follows ``fold`` to the module that defines it
(not every module the package ``__init__`` re-exports), then every import of that module, so
"reached" means "a fast test imports something that needs this module". A module reached only
from slow tests needs a small fast test of its own.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "easier"
TESTS = ROOT / "tests"

# Modules only slow tests reach today (or none: entry points); shrink, never grow.
UNREACHED_OK = {"easier.__main__"}  # `python -m easier`: cli.main, which fast tests call


def _path(mod: str) -> Path | None:
    rel = Path(*mod.split("."))
    for p in (SRC.parent / rel / "__init__.py", SRC.parent / rel.with_suffix(".py")):
        if p.is_file():
            return p
    return None


@cache
def _tree(mod: str) -> ast.Module:
    return ast.parse(_path(mod).read_text())  # type: ignore[union-attr]


def _stem(mod: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = _path(mod).name == "__init__.py"  # type: ignore[union-attr]
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(mod: str, node: ast.AST) -> set[str]:
    """Modules an import statement in ``mod`` needs (a name from a package: where it lives)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if _path(a.name)}
    if not isinstance(node, ast.ImportFrom):
        return set()
    stem = _stem(mod, node)
    if not stem.startswith("easier") or not _path(stem):
        return set()
    out = set()
    for a in node.names:
        out |= {f"{stem}.{a.name}"} if _path(f"{stem}.{a.name}") else _home(stem, a.name)
    return out


@cache
def _home(mod: str, name: str) -> frozenset[str]:
    """The module(s) that define ``name`` as seen from ``mod`` (through re-exports)."""
    if _path(mod).name != "__init__.py":  # type: ignore[union-attr]
        return frozenset({mod})
    for node in _tree(mod).body:
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                if (a.asname or a.name) == name:
                    stem = _stem(mod, node)
                    if _path(f"{stem}.{a.name}"):
                        return frozenset({f"{stem}.{a.name}"})
                    return _home(stem, a.name) if _path(stem) else frozenset({mod})
    return frozenset({mod})  # defined in the package itself, or a star: the package


def _reached(seeds: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(seeds)
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        parts = mod.split(".")  # importing a module runs its packages' __init__ too
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        if _path(mod).name == "__init__.py":  # type: ignore[union-attr]
            # its submodule imports register things (models, methods, data sources) and
            # count; its re-exported names count only where someone imports them
            for node in _tree(mod).body:
                if isinstance(node, ast.ImportFrom):
                    stem = _stem(mod, node)
                    todo += [f"{stem}.{a.name}" for a in node.names
                             if _path(f"{stem}.{a.name}")]
            continue
        for node in ast.walk(_tree(mod)):
            todo += sorted(_targets(mod, node))
    return seen


def _is_slow(fn: ast.AST) -> bool:
    return any("slow" in ast.unparse(d) for d in getattr(fn, "decorator_list", []))


def _fast_seeds() -> set[str]:
    seeds: set[str] = set()
    for f in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(f.read_text())
        marks = [n for n in tree.body if isinstance(n, ast.Assign)
                 and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)]
        tests = [n for n in tree.body if isinstance(n, ast.FunctionDef)
                 and n.name.startswith("test_")]
        if any("slow" in ast.unparse(m.value) for m in marks) or all(map(_is_slow, tests)):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                seeds |= {a.name for a in node.names if a.name.startswith("easier")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("easier"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    seeds |= {sub} if _path(sub) else set(_home(node.module, a.name))
    return {s for s in seeds if _path(s)}


def _all_modules() -> set[str]:
    out = set()
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        out.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_home_follows_re_exports():
    assert _home("easier", "fold") == {"easier.merge.api"}
    assert _home("easier", "measure_entropy") == {"easier.entropy.estimate"}


def test_every_module_is_reached_by_a_fast_test():
    missing = _all_modules() - _reached(_fast_seeds())
    assert missing - UNREACHED_OK == set(), "reached only by slow tests (or by none)"
    assert UNREACHED_OK - missing == set(), "reached now: remove from UNREACHED_OK"
