"""Run the README's quick start (its `easier reduce ...` line) and rewrite its result table.

The table between ``<!-- quickstart:begin -->`` and ``<!-- quickstart:end -->`` in README.md is
replaced by the dense-vs-returned table of a real run, its summary line, the wall time and the
machine (CPU count, load average before and after, torch version and threads), so the README
says what a user will see. ``--from-run DIR`` rewrites it from an existing run directory
instead (no wall time then). The command is read from the README's quick start (the first
line of its first code block that starts with ``easier reduce``), so the table always belongs to
the command a user is told to type.

    nice -n 5 python scripts/update_quickstart.py            # ~2.5 min on a quiet 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from easier.report.outcome import outcome, outcome_table, summary_line

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- quickstart:begin -->", "<!-- quickstart:end -->"


def quickstart_args(readme: str) -> list[str] | None:
    """The options of the README quick start's `easier reduce` line (after ``reduce``)."""
    head = readme.split(BEGIN)[0]
    for block in re.findall(r"```bash\n(.*?)```", head, re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["easier", "reduce"]:
                return words[2:]
    return None


def run_quickstart(out: Path, args: list[str]) -> tuple[float, tuple[float, ...], str]:
    """Run `easier reduce ARGS --quiet --out OUT`; wall s, load average before/after, stdout."""
    before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "easier", "reduce", *args, "--quiet", "--out",
                           str(out)], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"easier reduce failed ({proc.returncode}):\n{proc.stderr}")
    return wall, (*before, *os.getloadavg()), proc.stdout


def block(run: Path, wall: float | None, load: tuple[float, ...] | None) -> str:
    """The README text for a finished run directory."""
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines() if x]
    fold_file = run / "fold_measure.json"
    fold = json.loads(fold_file.read_text()) if fold_file.is_file() else None
    cfg = json.loads((run / "config.json").read_text())
    o = outcome(history, fold, unit=cfg.get("unit", "site"))
    kept = next(h for h in reversed(history) if h["accepted"])
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads")
    when = f"wall time {wall:.0f} s ({wall / 60:.1f} min)" if wall is not None else "wall time –"
    busy = ("" if load is None else
            f"; load average {load[0]:.1f} before and {load[3]:.1f} after the run (1 min)")
    return (f"{BEGIN}\nMeasured by `scripts/update_quickstart.py` ({when}; {machine}{busy}). "
            f"The run stopped after iteration {history[-1]['iteration']} and kept "
            f"iteration {kept['iteration']}:\n\n**{summary_line(o)}**\n\n{outcome_table(o)}\n"
            f"{END}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from-run", type=Path, default=None, help="use this finished run directory")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--keep", type=Path, default=None,
                   help="write the run here (a new directory) instead of a temporary one")
    p.add_argument("--print-command", action="store_true",
                   help="print the quick-start command read from the README and exit")
    args = p.parse_args()
    readme = args.readme.read_text()
    command = quickstart_args(readme)
    if command is None and (args.print_command or args.from_run is None):
        sys.exit(f"{args.readme}: no `easier reduce` line in a ```bash block before {BEGIN}")
    if args.print_command:
        print(shlex.join(["easier", "reduce", *command]))
        return
    if args.from_run is not None:
        text = block(args.from_run, None, None)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run = args.keep or Path(tmp) / "run"
            wall, load, stdout = run_quickstart(run, command)
            print(stdout)
            text = block(run, wall, load)
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        sys.exit(f"{args.readme} has no {BEGIN} ... {END} markers")
    args.readme.write_text(pattern.sub(lambda _m: text, readme))
    print(text)


if __name__ == "__main__":
    main()
