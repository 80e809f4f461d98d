"""The documents name only things that exist, and docs/cli.md's option tables match the parser."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_dotted_easier_path_and_repository_file_in_the_docs_exists(capsys):
    assert _script("check_doc_paths").main() == 0, capsys.readouterr().out


def test_the_path_checker_catches_a_wrong_path():
    check = _script("check_doc_paths")
    assert check.resolve("easier.merge.LatencyConfig") is None
    assert check.resolve("easier.fold.LatencyConfig") is not None   # fold is the function
    assert check.resolve("easier.distributed") is not None          # now easier.parallel


def test_cli_option_tables_are_generated_from_the_current_parser():
    doc = (ROOT / "docs" / "cli.md").read_text()
    assert _script("cli_reference").render(doc) == doc, "run python scripts/cli_reference.py"


def test_every_reduce_option_is_in_the_cli_doc_with_its_default():
    from easier.cli import build_parser

    doc = (ROOT / "docs" / "cli.md").read_text()
    sub = build_parser()._subparsers._group_actions[0].choices["reduce"]
    for action in sub._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert f"`{flag}`" in doc, flag
    assert "| `--seed` | `0` |" in doc and "| `--delta` | `1.0` |" in doc
