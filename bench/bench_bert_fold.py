"""BERT-base-shaped encoder, every MLP GELU linearized: folded vs unfolded; capture times.

    nice python bench/bench_bert_fold.py --threads 1      # BERT-base, batch 1 and 32, seq 128
    python bench/bench_bert_fold.py --quick --threads 1   # tiny config, seconds (smoke test)

The encoder is ``transformers.BertModel`` built from a ``BertConfig`` (random weights, nothing
downloaded): 12 layers, hidden 768, 12 heads, intermediate 3072. Every MLP activation
(``encoder.layer.N.intermediate.intermediate_act_fn``) is linearized with ``easier.linearize``,
so each MLP is ``Linear(768, 3072) -> Linear(3072, 768)`` plus the residual;
``easier.fold(plan="all")`` merges it into one 768x768 linear. The unfolded (linearized) and
folded models are timed side by side in one process, interleaved rounds in rotated order, at each
batch size (median ms per batch, IQR over rounds), on token ids of length ``--seq``. FLOPs come
from ``FlopCounterMode`` at each batch size; the error is the max over both outputs (last hidden
state, pooler) of the absolute difference, and relative to the largest output magnitude.

The second table is the ``easier.capture`` (``torch.export``, non-strict, dynamic batch) time of
each paper model in ``easier.models`` at 2x3x32x32 (batch 2, as easier captures: a one-sample
input would pin the batch size) (width 1.0; 0.125 with --quick) and of the encoder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
from _common import Table, add_common_args, header, ratio_cell, write_out
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import easier
from easier import models
from easier.graph.capture import capture
from easier.perf.timing import compare_samples, paired_samples

PAPER_MODELS = ("resnet18", "mobilenet_v2", "vgg16_bn", "swin_t")
BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072}
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64}


def encoder(shape: dict[str, int]) -> nn.Module:
    """A BertModel with random weights (seeded), eval mode, eager attention."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.BertConfig(**shape, vocab_size=30522 if shape == BASE else 100)
    return T.BertModel(cfg).eval()


def token_ids(batch: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch * 1000 + seq)
    return {"input_ids": torch.randint(5, vocab, (batch, seq), generator=gen)}


def outputs(model: nn.Module, x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**x)
    return [out["last_hidden_state"], out["pooler_output"]]


def flops(model: nn.Module, x: dict[str, torch.Tensor]) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**x)
    return int(counter.get_total_flops())


def errors(lin: nn.Module, folded: nn.Module, x: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max |folded - unfolded|, that divided by max |unfolded|) over every output."""
    pairs = list(zip(outputs(lin, x), outputs(folded, x), strict=True))
    err = max(float((a - b).abs().max()) for a, b in pairs)
    scale = max(float(a.abs().max()) for a, _ in pairs)
    return err, err / scale


def fold_table(shape: dict[str, int], seq: int, batches: list[int], rounds: int,
               sample_s: float) -> tuple[Table, dict[str, Any]]:
    """The folded-vs-unfolded table of the encoder, and facts for the header."""
    model = encoder(shape)
    vocab = model.config.vocab_size
    x2 = token_ids(2, seq, vocab)  # batch 2: a one-sample capture would pin the batch size
    mlp = [s.name for s in easier.find_sites(model, x2)
           if s.name.endswith("intermediate.intermediate_act_fn")]
    lin = easier.linearize(model, mlp, example_input=x2).eval()
    t0 = time.perf_counter()
    folded = easier.fold(lin, x2, plan="all")
    fold_s = time.perf_counter() - t0
    plan = folded.fold_plan  # type: ignore[attr-defined]
    merged_linear = sum(c.kind == "linear" for c in plan.merged)
    name = "BERT-base-shaped encoder" if shape == BASE else "Tiny BERT encoder (quick)"
    table = Table(
        f"{name}, {len(mlp)} MLP GELUs linearized: fold(plan='all') vs unfolded",
        ["batch x seq", "FLOPs unfolded", "FLOPs folded", "FLOPs ratio", "ms unfolded",
         "ms folded", "speed-up", "speed-up band", "max abs err", "max rel err", "rounds"],
        formats={"FLOPs unfolded": ".3e", "FLOPs folded": ".3e", "FLOPs ratio": ".3f",
                 "speed-up": ".2f", "max abs err": ".2e", "max rel err": ".2e"},
        suffix={"speed-up": "x"},
        note=(f"{merged_linear} of {len(plan.chains)} chains merged (each MLP's two linears into "
              f"one); fold took {fold_s:.1f} s. FLOPs per batch (FlopCounterMode, 2·MACs); ms "
              "per batch, median ± IQR over interleaved rounds (order rotated) in one process; "
              "speed-up = median over rounds of unfolded ms / folded ms *of the same round*, "
              "so load that hits both alike cancels; the band is its sign-test interval "
              "(easier.perf.timing.Comparison; min..max up to 8 rounds). Errors in float32 on this "
              "batch's random token ids."),
    )
    for b in batches:
        xb = token_ids(b, seq, vocab)
        f_lin, f_fold = flops(lin, xb), flops(folded, xb)
        err, rel = errors(lin, folded, xb)
        with torch.no_grad():
            samples = paired_samples([lambda xb=xb: lin(**xb), lambda xb=xb: folded(**xb)],
                                     rounds=rounds, min_run_time=sample_s * rounds)
        c = compare_samples(*samples)
        table.add(f"{b} x {seq}", f_lin, f_fold, ratio_cell(f_fold, f_lin),
                  f"{c.before_ms:.4g} ± {c.before_iqr_ms:.2g}",
                  f"{c.after_ms:.4g} ± {c.after_iqr_ms:.2g}", 1 / c.ratio,
                  f"{1 / c.ratio_hi:.2f}..{1 / c.ratio_lo:.2f}", err, rel, rounds)
        print(table.row_line(table.rows[-1]), flush=True)
    return table, {"sites": len(mlp), "merged": merged_linear}


def capture_seconds(model: nn.Module, x: Any, repeats: int) -> tuple[float, float, int]:
    """(median s, max s, graph nodes) of ``repeats`` fresh captures."""
    times, nodes = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        cap = capture(model, x)
        times.append(time.perf_counter() - t0)
        nodes = len(cap.gm.graph.nodes)
    return statistics.median(times), max(times), nodes


def capture_table(names: list[str], width: float, shape: dict[str, int], seq: int,
                  repeats: int) -> Table:
    table = Table(
        "Capture time (easier.capture: torch.export, non-strict, dynamic batch)",
        ["model", "input", "capture s (median)", "max s", "runs", "graph nodes"],
        formats={"capture s (median)": ".2f", "max s": ".2f"},
        note=("Wall time of one capture of a fresh eval-mode model (random weights), repeated; "
              "the first capture of the process includes torch.export's own warm-up, so every "
              "model is captured once before timing."),
    )
    cases: list[tuple[str, nn.Module, Any, str]] = []
    for name in names:
        torch.manual_seed(0)
        model = models.create(name, num_classes=10, width=width, image_size=32).eval()
        cases.append((f"{name} (width {width:g})", model, torch.randn(2, 3, 32, 32), "2x3x32x32"))
    label = "BERT-base encoder" if shape == BASE else "tiny BERT encoder"
    bert = encoder(shape)
    cases.append((label, bert, token_ids(2, seq, bert.config.vocab_size), f"2x{seq} token ids"))
    capture(cases[0][1], cases[0][2])  # process warm-up, not charged to the first model
    for label, model, x, what in cases:
        med, worst, nodes = capture_seconds(model, x, repeats)
        table.add(label, what, med, worst, repeats, nodes)
        print(table.row_line(table.rows[-1]), flush=True)
    return table


def main(argv: list[str] | None = None) -> tuple[Table, Table]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,32; quick 1,2)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 128; quick 16)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved timing rounds (default 7; quick 2)")
    ap.add_argument("--capture-repeats", type=int, default=None, help="default 3; quick 1")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    shape = TINY if quick else BASE
    seq = args.seq or (16 if quick else 128)
    batches = [int(b) for b in (args.batch_sizes or ("1,2" if quick else "1,32")).split(",")]
    rounds = args.rounds or (2 if quick else 7)
    repeats = args.capture_repeats or (1 if quick else 3)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    head = header(batches, f"sequence {seq}; {rounds} interleaved rounds per variant; load "
                  f"average at start {load}{' (quick: tiny config)' if quick else ''}")
    print(head, flush=True)
    fold_t, _ = fold_table(shape, seq, batches, rounds, sample_s=0.02 if quick else 0.2)
    cap_t = capture_table(list(PAPER_MODELS), 0.125 if quick else 1.0, shape, seq, repeats)
    for t in (fold_t, cap_t):
        print("\n" + t.markdown(), flush=True)
    write_out(args.out, head, [fold_t, cap_t])
    return fold_t, cap_t


if __name__ == "__main__":
    main(sys.argv[1:])
