"""Run the README's quick start over several seeds and print the range of each number.

    nice -n 5 python scripts/quickstart_seeds.py --seeds 0 1 2      # ~2.5 min per seed, quiet CPU

The command is the README quick start's `easier reduce` line (read as
``scripts/update_quickstart.py`` reads it) with ``--seed S``; each run goes to a temporary
directory. Per seed: sites removed, depth, val change, the fold's speed at batch 1 with its
noise band, wall time; then min–max over the seeds, so a README can quote a range instead of
one run's numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _quickstart() -> object:
    spec = importlib.util.spec_from_file_location("update_quickstart",
                                                  ROOT / "scripts" / "update_quickstart.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def numbers(run: Path) -> dict[str, float]:
    """The numbers of one finished run directory."""
    hist = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    kept = next(h for h in reversed(hist) if h["accepted"])
    out = {"removed": float(len(kept["removed"])), "depth": float(kept.get("depth") or 0),
           "val_change": kept["val_acc"] - hist[0]["val_acc"]}
    fold = run / "fold_measure.json"
    if fold.is_file():
        f = json.loads(fold.read_text())
        lat = {lt["batch_size"]: lt["median_ms"] for lt in f["before"].get("latency", ())}
        aft = {lt["batch_size"]: lt["median_ms"] for lt in f["after"].get("latency", ())}
        if 1 in lat and 1 in aft:
            out["speedup_b1"] = lat[1] / aft[1]
        for p in f.get("paired", ()):
            if int(p["batch_size"]) == 1:
                out["band_lo"], out["band_hi"] = float(p["ratio_lo"]), float(p["ratio_hi"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    qs = _quickstart()
    cmd = qs.quickstart_args((ROOT / "README.md").read_text())  # type: ignore[attr-defined]
    if cmd is None:
        raise SystemExit("no `easier reduce` line in the README's quick start")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            wall, _, _ = qs.run_quickstart(  # type: ignore[attr-defined]
                Path(tmp) / f"s{seed}", [*cmd, "--seed", str(seed)])
            row = numbers(Path(tmp) / f"s{seed}") | {"wall_s": wall}
            rows.append(row)
            print(f"seed {seed}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()),
                  flush=True)
    keys = sorted({k for r in rows for k in r})
    print("range over seeds " + " ".join(map(str, args.seeds)) + ":")
    for k in keys:
        vals = [r[k] for r in rows if k in r]
        print(f"  {k}: {min(vals):.3g} – {max(vals):.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
