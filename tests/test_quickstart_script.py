"""scripts/update_quickstart.py rewrites only the README block between its markers."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "update_quickstart.py"


def test_block_between_markers_is_replaced_from_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    history = [
        {"iteration": 0, "removed": [], "accepted": True, "val_acc": 97.0, "test_acc": 97.5,
         "params": 10, "flops": 40, "depth": 18, "activations": 17},
        {"iteration": 1, "removed": ["a", "b", "c"], "accepted": True, "val_acc": 96.5,
         "test_acc": 97.0, "params": 10, "flops": 40, "depth": 18, "activations": 14},
        {"iteration": 2, "removed": ["a", "b", "c", "d"], "accepted": False, "val_acc": 90.0,
         "test_acc": 91.0, "params": 10, "flops": 40, "depth": 18, "activations": 13},
    ]
    (run / "history.jsonl").write_text("\n".join(json.dumps(h) for h in history) + "\n")
    (run / "config.json").write_text(json.dumps({"unit": "site"}))
    (run / "fold_measure.json").write_text(json.dumps({
        "before": {"params": 10, "flops_per_sample": 20.0, "depth": 18, "activations": 14,
                   "latency": [{"batch_size": 1, "median_ms": 3.0}]},
        "after": {"params": 9, "flops_per_sample": 18.0, "depth": 16, "activations": 14,
                  "latency": [{"batch_size": 1, "median_ms": 2.0}]}}))
    readme = tmp_path / "README.md"
    readme.write_text("# x\nbefore\n<!-- quickstart:begin -->\nold numbers\n"
                      "<!-- quickstart:end -->\nafter\n")
    subprocess.run([sys.executable, str(SCRIPT), "--from-run", str(run), "--readme",
                    str(readme)], check=True, capture_output=True, timeout=120)
    text = readme.read_text()
    assert text.startswith("# x\nbefore\n<!-- quickstart:begin -->\n")
    assert text.endswith("<!-- quickstart:end -->\nafter\n") and "old numbers" not in text
    # by hand: 17 - 14 = 3 removed, depth 18 -> 16, 3.0 / 2.0 ms, 96.5 - 97.0 points
    assert ("**3/17 activations removed, depth 18 → 16, 1.50× faster at batch 1 after folding, "
            "val −0.5 pts**") in text
    assert "kept iteration 1" in text


def _command(readme: Path) -> str:
    return subprocess.run([sys.executable, str(SCRIPT), "--readme", str(readme),
                           "--print-command"], check=True, capture_output=True, text=True,
                          timeout=120).stdout.strip()


def test_the_command_run_is_the_one_the_readme_tells_users_to_type(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n```bash\npip install -e .\neasier reduce --model mlp  # comment\n```\n"
                      "```bash\neasier reduce --model other\n```\n"
                      "<!-- quickstart:begin -->\n<!-- quickstart:end -->\n")
    assert _command(readme) == "easier reduce --model mlp"


def test_the_real_quickstart_command_is_a_valid_reduce_invocation():
    from easier.cli import build_parser

    words = _command(SCRIPT.parent.parent / "README.md").split()
    assert words[:2] == ["easier", "reduce"]
    args = build_parser().parse_args(words[1:])  # exits 2 on an option that does not exist
    assert args.command == "reduce"
