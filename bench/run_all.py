"""Run every benchmark script and write docs/BENCHMARKS.md.

    python bench/run_all.py                        # full: about 30 min on 2 cores
    python bench/run_all.py --quick --doc /tmp/b.md   # smoke run: tiny sizes, under a minute

Each script runs in its own Python process (clean allocator, thread pool and caches; one failure
does not stop the others), with ``--quick`` and ``--threads`` passed through. Its output is shown
as it runs; its tables (``--out``) go into the document with a sentence on what they measure and
the target. The reproduction runs before the whole-model fold benchmark, which also folds the
site set that the reproduction's EASIER loop (seed 0) kept.

In full mode the document is docs/BENCHMARKS.md and the plot docs/reproduction.png; with
``--quick`` the document goes to ``--doc`` (default: a new temporary file), never over the real one.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import header

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


@dataclass(frozen=True)
class Script:
    """One benchmark: its file, a title and the sentence that introduces it in the document."""

    key: str
    file: str
    title: str
    about: str
    takes_out: bool = True  # False: the script has no --out and its stdout is the section


SCRIPTS = (
    Script(
        "entropy",
        "bench_entropy.py",
        "Entropy pass: overhead in time and memory",
        "Cost of measuring every activation's ON/OFF entropy (streaming counters hooked "
        "into one forward pass) relative to a plain forward pass of the same batches. "
        "Targets: time <= 1.05x, peak memory <= 1.1x.",
    ),
    Script(
        "fold",
        "bench_fold.py",
        "Folding hand-built linear chains",
        "Latency of single linear chains before and after merging: the original chain, the "
        "chain with its padding relocated (the form fine-tuning sees) and the merged layer. "
        "Shows which merges pay on this CPU (merged faster than relocated) and which do not.",
    ),
    Script(
        "fold_models",
        "bench_fold_models.py",
        "Folding whole models",
        "The paper's four models with a realistic set of activations linearized, folded "
        "under each planner mode, timed side by side with the unfolded model. Targets: "
        ">= 1.5x faster where the FLOPs allow it, never slower under the 'latency' plan.",
    ),
    Script(
        "bert_fold",
        "bench_bert_fold.py",
        "Folding a BERT-base encoder, and capture times",
        "A BERT-base-shaped encoder (transformers BertConfig, random weights) with every MLP "
        "GELU linearized, folded with plan='all' (each MLP's two linears become one) against "
        "the unfolded model at batch 1 and 32, sequence 128; and the torch.export capture time "
        "of each paper model and of that encoder.",
    ),
    Script(
        "reproduction",
        "bench_reproduction.py",
        "Reproduction: does the entropy order matter?",
        "EASIER's lowest-entropy-first order against random and highest-entropy-first "
        "orders, from the same pretrained model with the same fine-tune budget, over several "
        "seeds. Target: the paper's claim that the entropy order keeps accuracy longest "
        "(reported either way), and the retraining budget next to the paper's recipe.",
    ),
    Script(
        "entropy_order",
        "bench_entropy_order.py",
        "Does the entropy order matter where non-linearity matters?",
        "Settings where linearizing every site costs many points (a 6-hidden-layer MLP and a "
        "5-conv CNN without pooling on mnist5k): easier, easier with the reference's entropy "
        "timing, random and max-entropy orders (and the sibling methods), paired by seed, "
        "test top-1 before fine-tuning (BN re-estimated) and after, with bootstrap intervals "
        "of the paired differences. Target: an answer, whichever it is.",
    ),
    Script(
        "latency_method",
        "bench_latency_method.py",
        "Removing what makes it faster: easier-latency against easier and random",
        "MobileNetV2 and ResNet-18 (width 0.25) on mnist5k, 3 seeds, one dense model per seed "
        "shared by every method: per iteration, test top-1 against the measured speed-up of "
        "the folded model over the dense one (batch 1, paired rounds) and against FLOPs. "
        "Target: the best speed-up within 1 point of dense accuracy, per method, reported as "
        "found.",
    ),
    Script(
        "entropy_floor",
        "bench_entropy_floor.py",
        "Entropy pass: where the time goes",
        "The instrumented pass with the previous and current counters, the counters alone, and "
        "the memory-traffic floor (one read and write of every pre-activation), each as a share "
        "of one plain forward, side by side. Target: <= 1.05x a plain forward, or the floor.",
    ),
    Script(
        "linear_replacement",
        "bench_linear_replacement.py",
        "Linear replacement: identity vs affine",
        "Single-site test top-1 drop before any fine-tuning, identity vs the per-channel "
        "least-squares affine map, with stale and re-estimated BN statistics (mlp6, cnn5 on "
        "mnist5k). Target: affine no worse than identity; the default changes only if it wins.",
    ),
    Script(
        "time_to_result",
        "bench_time_to_result.py",
        "Time to result",
        "Today's fixed fine-tune budget after each removal against early stop (fine-tune until "
        "a validation subset is back within delta) and early stop with distillation from the "
        "dense model, from the same pretrained model per seed: fine-tune steps, wall time, "
        "sites removed within delta, kept val/test top-1. Target: the same or more sites "
        "removed at the same delta with <= 0.5x the fine-tuning steps.",
    ),
)
SCRIPTS += (
    Script(
        "fmnist",
        "bench_fmnist.py",
        "Fashion-MNIST: the method comparison on real data",
        "Every method from the same dense ResNet-18 / MobileNetV2 checkpoints per seed, the same "
        "fine-tune budget per removal, delta 1 point: activations removed, test top-1, folded "
        "latency vs dense. Full mode reports the campaign's saved rows "
        "(bench/results/fmnist.jsonl; the campaign itself takes hours: "
        "`python bench/bench_fmnist.py`); --quick runs a tiny campaign.",
    ),
)
# fold_models uses the reproduction's run
RUN_ORDER = ("entropy", "entropy_floor", "fold", "reproduction", "fold_models", "bert_fold",
             "entropy_order", "linear_replacement", "time_to_result", "latency_method", "fmnist")


def run_script(script: Script, args: list[str], out: Path | None) -> tuple[int, str, float]:
    """(exit code, captured stdout+stderr, seconds); the output is echoed line by line."""
    cmd = [sys.executable, str(BENCH / script.file), *args]
    if out is not None:
        cmd += ["--out", str(out)]
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    lines: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    return proc.returncode, "".join(lines), time.perf_counter() - t0


def section(script: Script, rc: int, output: str, out: Path | None, seconds: float) -> str:
    """The document section of one script (its tables, or the failure's last lines)."""
    head = f"## {script.title}\n\n{script.about}\n\n`python bench/{script.file}` ({seconds:.0f} s)"
    if rc != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        return f"{head}\n\n**FAILED (exit code {rc})**; last lines:\n\n```\n{tail}\n```"
    body = out.read_text(encoding="utf-8").strip() if out is not None and out.exists() else ""
    if not script.takes_out:
        body = output.strip()
    return f"{head}\n\n{body}"


def doc_path(quick: bool, doc: str | None) -> Path:
    """Where the document goes: --doc, else docs/BENCHMARKS.md (full) or a new temp file (quick)."""
    if doc:
        return Path(doc)
    if quick:
        fd, name = tempfile.mkstemp(prefix="BENCHMARKS-quick-", suffix=".md")
        os.close(fd)
        return Path(name)
    return ROOT / "docs" / "BENCHMARKS.md"


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every script with --quick")
    ap.add_argument("--threads", type=int, default=None, help="passed to every script")
    ap.add_argument(
        "--doc",
        default=None,
        help="document to write (full default docs/BENCHMARKS.md; quick: temp file)",
    )
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(RUN_ORDER)}")
    args = ap.parse_args(argv)
    doc = doc_path(args.quick, args.doc)
    only = args.only.split(",") if args.only else list(RUN_ORDER)
    unknown = sorted(set(only) - set(RUN_ORDER))
    if unknown:
        raise SystemExit(f"--only: unknown {unknown}; choose from {','.join(RUN_ORDER)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    common = (["--quick"] if args.quick else []) + (
        ["--threads", str(args.threads)] if args.threads else []
    )
    by_key = {s.key: s for s in SCRIPTS}
    sections: dict[str, str] = {}
    failed: list[str] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="easier-bench-") as tmp:
        tmpdir = Path(tmp)
        work = tmpdir / "reproduction"
        for key in (k for k in RUN_ORDER if k in only):
            script = by_key[key]
            extra = list(common)
            if key == "reproduction":
                extra += ["--workdir", str(work), "--plot", str(doc.parent / "reproduction.png")]
            if key == "fold_models" and (work / "seed0" / "easier" / "summary.json").exists():
                extra += ["--run", str(work / "seed0" / "easier")]
                if not args.quick:
                    extra += ["--run-width", "1.0"]
            if key == "fmnist" and not args.quick:
                extra += ["--report"]  # the saved campaign rows, not hours of training
            out = tmpdir / f"{key}.md" if script.takes_out else None
            rc, output, secs = run_script(script, extra, out)
            sections[key] = section(script, rc, output, out, secs)
            if rc != 0:
                failed.append(key)
    total = time.perf_counter() - t0
    mode = "quick (smoke-test sizes: the numbers mean nothing)" if args.quick else "full"
    intro = [
        "# Benchmarks",
        "",
        f"Generated {datetime.date.today().isoformat()} by `python bench/run_all.py"
        f"{' --quick' if args.quick else ''}` in {total / 60:.1f} min, mode: {mode}. "
        "Regenerate with `python bench/run_all.py` (full, about 15-20 min on 2 cores; writes this "
        "file and docs/reproduction.png) or run one script (`--help` lists its flags). "
        "Every ratio is measured side by side in one process "
        "(interleaved repeats, medians), so it holds on a busy machine even when absolute "
        "times drift.",
        "",
        header("per table (see each table's header line)"),
    ]
    keys = [s.key for s in SCRIPTS if s.key in sections]
    text = "\n".join(intro) + "\n\n" + "\n\n".join(sections[k] for k in keys) + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text, encoding="utf-8")
    print(f"\nwrote {doc} ({total:.0f} s)" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if failed:
        raise SystemExit(1)
    return [sections[k] for k in keys]


if __name__ == "__main__":
    main(sys.argv[1:])
