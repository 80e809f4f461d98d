"""Sweep public architectures through find_sites -> linearize-all -> fold, one line per model.

    python bench/zoo_sweep.py                 # every zoo that is installed, the default lists
    python bench/zoo_sweep.py --only timm:rexnet_100 torchvision:inception_v3
    python bench/zoo_sweep.py --zoo transformers

Builds each architecture with random weights (nothing is downloaded), linearizes every site
(``fold_ready=True``), folds with plan "all" (the verification of :mod:`easier.merge.verify`) and
measures FLOPs. A model that fails says at which step and why, and the sweep goes on. torchvision
and timm are optional (see docs/models.md for installing them beside a CPU torch); transformers
models are built from small configs.
"""

from __future__ import annotations

import argparse
import importlib
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import easier
from easier.perf.measure import measure

TORCHVISION = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
               "squeezenet1_0", "inception_v3", "shufflenet_v2_x0_5", "regnet_x_400mf",
               "densenet121", "convnext_tiny", "vgg11_bn", "mnasnet0_5"]
TIMM = ["resnet18", "rexnet_100", "efficientnet_b0", "mobilevitv2_050", "ghostnet_100",
        "mobilenetv3_small_050", "repvgg_a0", "regnetx_002", "dla34", "hrnet_w18_small"]


def _transformers() -> dict[str, Callable[[], tuple[nn.Module, Any]]]:
    t = importlib.import_module("transformers")
    img = torch.randn(2, 3, 64, 64)
    ids = torch.randint(0, 50, (2, 8))

    def vit() -> tuple[nn.Module, Any]:
        cfg = t.ViTConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, num_labels=10)
        return t.ViTForImageClassification(cfg), img

    def resnet() -> tuple[nn.Module, Any]:
        cfg = t.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                             num_labels=10)
        return t.ResNetForImageClassification(cfg), img

    def mobilevit() -> tuple[nn.Module, Any]:
        cfg = t.MobileViTV2Config(image_size=64, width_multiplier=0.5, num_labels=10)
        return t.MobileViTV2ForImageClassification(cfg), img

    def bert() -> tuple[nn.Module, Any]:
        cfg = t.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, num_labels=3)
        return t.BertForSequenceClassification(cfg), ids

    def mamba() -> tuple[nn.Module, Any]:
        cfg = t.MambaConfig(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=2,
                            intermediate_size=32)
        return t.MambaModel(cfg), ids

    return {"transformers:vit": vit, "transformers:resnet": resnet,
            "transformers:mobilevitv2": mobilevit, "transformers:bert": bert,
            "transformers:mamba": mamba}


def builders(zoos: list[str]) -> dict[str, Callable[[], tuple[nn.Module, Any]]]:
    """name -> builder of (model, example input) for every installed zoo in ``zoos``."""
    out: dict[str, Callable[[], tuple[nn.Module, Any]]] = {}
    img = torch.randn(2, 3, 96, 96)
    for zoo, names in (("torchvision", TORCHVISION), ("timm", TIMM)):
        if zoo not in zoos:
            continue
        try:
            importlib.import_module(zoo)
        except Exception as exc:  # not installed, or built for another torch
            print(f"{zoo}: skipped ({type(exc).__name__}: {exc})")
            continue
        for n in names:
            spec = f"{zoo}:{n}"
            size = {"inception_v3": 299}.get(n, 96)
            x = img if size == 96 else torch.randn(2, 3, size, size)
            out[spec] = (lambda s=spec, x=x: (easier.models.create(
                s, num_classes=10, in_channels=3, width=1.0, image_size=x.shape[-1]), x))
    if "transformers" in zoos:
        try:
            out.update(_transformers())
        except Exception as exc:
            print(f"transformers: skipped ({type(exc).__name__}: {exc})")
    return out


def sweep_one(build: Callable[[], tuple[nn.Module, Any]]) -> str:
    """One result line: sites, chains merged, fold error and FLOPs, or the step that failed."""
    step = "build"
    dense: Any = None
    flag = ""
    try:
        torch.manual_seed(0)
        model, x = build()
        model.eval()
        step = "measure"
        dense = measure(model, x, latency=False)
        flag = f"; {dense.flops_note}" if dense.flops_note else ""
        step = "find_sites"
        sites = [s.name for s in easier.find_sites(model, x)]
        step = "linearize"
        lin = easier.linearize(model, sites, example_input=x, fold_ready=True)
        step = "fold"
        folded = easier.fold(lin, x, "all")
        plan = folded.fold_plan
        notes = f"; notes: {' | '.join(plan.notes)}" if plan.notes else ""
        return (f"ok: {len(sites)} sites, {len(plan.merged)}/{len(plan.chains)} chains merged, "
                f"max |err| {plan.max_abs_error:.2g}, dense {dense.flops_per_sample:.3g} "
                f"FLOPs/sample{flag}{notes}")
    except Exception as exc:
        last = traceback.extract_tb(exc.__traceback__)[-1]
        done = f"dense {dense.flops_per_sample:.3g} FLOPs/sample{flag}; " if step != "measure" \
            and step != "build" else ""
        return (f"{done}FAILED at {step}: {type(exc).__name__}: {str(exc)[:300]} "
                f"({last.filename.rsplit('/', 1)[-1]}:{last.lineno})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zoo", nargs="+", default=["torchvision", "timm", "transformers"])
    p.add_argument("--only", nargs="+", default=None, help="model names as listed")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    todo = builders(args.zoo)
    if args.only:
        todo = {k: v for k, v in todo.items() if k in set(args.only)}
    for name, build in todo.items():
        t0 = time.perf_counter()
        line = sweep_one(build)
        print(f"{name}: {line} [{time.perf_counter() - t0:.1f}s]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
