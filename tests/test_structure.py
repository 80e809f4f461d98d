"""The layout rules of the house, checked on the source tree (fast: ast only, plus imports).

Each rule is a test so that a regression fails CI; where the tree breaks a rule today, the
offenders are listed in an explicit allow-list next to the check, to be shrunk, never grown.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import easier

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "easier"
MAX_LINES = 400

# Today's offenders. Shrink these lists as the code is fixed; a fixed entry fails the test
# (so the list cannot go stale).
TOO_LONG: set[str] = set()
PRIVATE_IMPORTS: set[tuple[str, str]] = set()  # (importing module, "module.name")
STALE_DOC_PATHS: set[str] = {"easier.fronts"}  # README: now easier.pipeline.fronts


def _modules() -> dict[str, Path]:
    """Every module of src/easier by dotted name (a package by its __init__.py)."""
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module imported from, names) of every import in a module, function-level ones too."""
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            found.append((stem, [a.name for a in node.names]))
    return found


def _edges() -> dict[str, set[str]]:
    """Module -> the modules of easier it imports (a name from a package counts as the
    submodule when one has that name, else as the package)."""
    edges = {}
    for name, path in MODULES.items():
        deps = set()
        for stem, names in _imports(name, path):
            subs = {f"{stem}.{n}" for n in names} & MODULES.keys()
            deps |= subs
            if len(subs) < len(names) or not names:
                deps.add(stem)
        edges[name] = {d for d in deps if d in MODULES and d != name}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_is_over_400_lines():
    long = {n for n, f in MODULES.items() if len(f.read_text().splitlines()) > MAX_LINES}
    assert long - TOO_LONG == set(), f"modules over {MAX_LINES} lines"
    assert TOO_LONG - long == set(), "fixed: remove from TOO_LONG"


def test_no_import_cycles_counting_function_level_imports():
    assert _cycles(_edges()) == []


def test_no_private_name_is_imported_across_modules():
    found = set()
    for name, path in MODULES.items():
        for stem, names in _imports(name, path):
            if stem.split(".")[0] != "easier" or stem == name:
                continue
            found |= {(name, f"{stem}.{n}") for n in names
                      if n.startswith("_") and not n.startswith("__")}
    assert found - PRIVATE_IMPORTS == set(), "private names imported from another module"
    assert PRIVATE_IMPORTS - found == set(), "fixed: remove from PRIVATE_IMPORTS"


def test_no_package_attribute_shadows_its_submodule():
    """``easier.merge.plan`` must be the module, never a function of the same name."""
    for info in pkgutil.walk_packages(easier.__path__, "easier."):
        if info.name.endswith("__main__"):
            continue
        parent = importlib.import_module(info.name.rpartition(".")[0])
        child = importlib.import_module(info.name)
        assert getattr(parent, info.name.rpartition(".")[2]) is child, info.name
    subpackages = {p.parent.name for p in SRC.glob("*/__init__.py")}
    clash = {n for n in subpackages if callable(easier.__dict__.get(n))}
    assert clash == set(), "functions of easier named like its subpackages"


def test_only_a_handful_of_top_level_modules():
    top = {f.stem for f in SRC.glob("*.py")}
    assert top <= {"__init__", "__main__", "errors", "config", "batch"}, top


def _resolves(dotted: str) -> bool:
    """Whether ``dotted`` is a module, or an attribute chain under the longest module prefix."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def _doc_paths() -> set[str]:
    """``easier.X(.Y...)`` inside backticks in README.md and docs/*.md (not file names)."""
    found = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for code in re.findall(r"`([^`\n]+)`", doc.read_text()):
            for m in re.finditer(r"(?<![\w./-])easier(?:\.[A-Za-z_]\w*)+", code):
                if not re.match(r"\.(md|py|json|lock|toml|txt|pt|log)\b", code[m.end() - 5:]):
                    found.add(m.group(0))
    return found


def test_the_doc_path_finder_reads_backticks():
    assert _resolves("easier.merge.fold") and _resolves("easier.perf.timing.Comparison")
    assert not _resolves("easier.no_such_thing") and not _resolves("easier.fold.nope")
    paths = _doc_paths()  # README names the first; docs/RELIABILITY.md `.easier.lock` (a file)
    assert "easier.perf.timing.Comparison" in paths and "easier.lock" not in paths


@pytest.mark.parametrize("dotted", sorted(_doc_paths()))
def test_every_dotted_path_in_the_docs_imports(dotted):
    if dotted in STALE_DOC_PATHS:
        pytest.xfail("stale path in the docs (allow-listed)")
    assert _resolves(dotted), f"{dotted} (README.md or docs/*.md) does not import"
