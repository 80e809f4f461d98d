"""The commands: each parses nothing, calls the library, and prints what a person reads."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from easier.cli.session import (
    build_base,
    device,
    existing_run,
    join,
    locked,
    method_with_options,
    out_dir,
    parse_options,
    say,
    setup,
)
from easier.errors import ConfigError, StateError
from easier.report.outcome import near_chance, outcome_of, outcome_table, summary_line

DEFAULT_METHOD = "easier"  # the paper's method
# removed the most activations within delta on every seed of both Fashion-MNIST models
RECOMMENDED_METHOD = "probe"
COMPARE_METHODS = f"{DEFAULT_METHOD},{RECOMMENDED_METHOD},egp,lacoot,tlc,layer-folding,random"

__all__ = ["cmd_compare", "cmd_entropy", "cmd_fold", "cmd_list", "cmd_reduce", "end_of_run",
           "trust_model_code"]


def end_of_run(result: Any, *, num_classes: int, unit: str) -> list[str]:
    """The lines printed after a run: dense vs returned table, warnings, one summary line
    (the outcome :func:`easier.reduce` wrote into report.md, or computed here)."""
    o = result.extras.get("outcome") or outcome_of(result, unit)
    lines = ["", outcome_table(o), ""]
    warning = near_chance(result.baseline["val_acc"], num_classes)
    if warning:
        lines.append(warning)
    lines.append(summary_line(o))
    return lines


def cmd_reduce(args: argparse.Namespace) -> int:
    from easier.io.artifacts import FoldOptions
    from easier.parallel import is_main
    from easier.pipeline.reduce import reduce

    method = method_with_options(args.method, args.method_option)
    out = out_dir(args, args.model, args.data, args.method, f"s{args.seed}")
    budget = {"max_removals": args.max_removals, "max_iterations": args.max_iterations,
              "run_all": args.all}
    finished = existing_run(out, args.resume, not args.no_fold, budget)  # before any loading
    if finished:
        print(finished)
        return 0
    info = join(args)
    with locked(out, info):
        env = setup(args, info)
        say(f"method {args.method} {method.options() or ''} -> {out}")
        t0 = time.perf_counter()
        model = env["make_model"]()
        result = reduce(model, env["splits"].train, env["splits"].val,
                        method=method, out=out, resume=args.resume,
                        fold=None if args.no_fold else FoldOptions(args.plan, args.plan_batch),
                        **env["kwargs"])
    if is_main():
        print()
        print(result.table())
        print(f"\nkept {len(result.linearized)} removed unit(s): "
              f"{', '.join(result.linearized) or 'none'}")
        print(f"stopped: {result.stop_reason}; wall time {time.perf_counter() - t0:.1f}s; "
              f"run directory: {out}")
        print("\n".join(end_of_run(result, num_classes=env["splits"].num_classes,
                                   unit=method.unit)))
    return 0


def compare_methods(args: argparse.Namespace) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Method names and options, every one checked before anything runs."""

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods: give at least one method name (easier methods)")
    opts: dict[str, dict[str, Any]] = {}
    items: dict[str, list[str]] = {}
    for item in args.method_option:
        name, sep, rest = item.partition(":")
        if not sep or name not in methods:
            raise ConfigError(f"--method-option {item!r}: expected METHOD:KEY=VALUE with METHOD "
                              f"one of {methods}")
        opts.setdefault(name, {}).update(parse_options([rest]))
        items.setdefault(name, []).append(rest)
    for name in methods:  # an unknown name or option fails now, not after the first run
        method_with_options(name, items.get(name, []))
    return methods, opts


def compare_fronts(args: argparse.Namespace) -> Any:
    """The fronts' settings (False without --fronts), checked before anything runs."""
    from easier.pipeline.fronts import FrontConfig

    if args.front_batch is not None and not args.fronts:
        raise ConfigError("--front-batch times the fronts: add --fronts")
    if not args.fronts:
        return False
    return FrontConfig(plan=args.plan, batch_sizes=args.front_batch or (1,))


def cmd_compare(args: argparse.Namespace) -> int:
    from easier.pipeline.compare import compare, comparison_table

    methods, opts = compare_methods(args)
    fronts = compare_fronts(args)
    out = out_dir(args, "compare", args.model, args.data, f"s{args.seed}")
    info = join(args)
    with locked(out, info):
        env = setup(args, info)
        t0 = time.perf_counter()
        rows = compare(env["make_model"], env["splits"].train, env["splits"].val,
                       methods=methods, out=out, method_options=opts, plan=args.plan,
                       resume=args.resume, fronts=fronts, **env["kwargs"])
    print()
    print(comparison_table(rows))
    extra = ", fronts.png and METHOD/front.csv" if fronts else ""
    print(f"\nwall time {time.perf_counter() - t0:.1f}s; wrote {out}/comparison.md, "
          f"comparison.csv, comparison.png{extra}")
    return 0


def cmd_entropy(args: argparse.Namespace) -> int:
    from easier.cli.user import load_checkpoint, load_data
    from easier.entropy.estimate import measure_entropy
    from easier.train.finetune import make_loader

    splits = load_data(args.data, seed=args.seed, image_size=args.image_size,
                       input_key=args.input_key)
    base = None
    if args.model is not None:
        base = build_base(args.model, num_classes=splits.num_classes,
                          in_channels=splits.in_channels, image_size=splits.image_size,
                          width=args.width)
    model = load_checkpoint(args.checkpoint, base, allow_pickle=args.allow_pickle)
    report = measure_entropy(model, make_loader(splits.train_eval, args.batch_size,
                                                shuffle=False),
                             estimator=args.estimator, neuron=args.neuron,
                             max_batches=args.max_batches, device=device(args.device),
                             progress=not args.quiet, input_key=args.input_key)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(report)
    return 0


def cmd_fold(args: argparse.Namespace) -> int:
    from easier.io.artifacts import FoldOptions, fold_run
    from easier.io.records import RunDir, lock_run_dir

    run = RunDir(args.run_dir)
    if not run.config_path.is_file():
        raise StateError(f"{run.path} is not a run directory (no config.json); pass the --out "
                         "directory of an `easier reduce` run")
    cfg = run.read_config()
    base = None
    if cfg.get("model_kwargs"):  # a run of the user's module:callable model
        spec = cfg["model"]  # a file named relative to where the run started: found anywhere
        if cfg.get("model_file") and Path(cfg["model_file"].rpartition(":")[0]).is_file():
            spec = cfg["model_file"]
        trust_model_code(run.config_path, cfg, spec, args.model)
        base = build_base(spec, width=cfg.get("width", 1.0), **cfg["model_kwargs"])
    elif cfg.get("model_spec") is None and "model_spec" in cfg:
        raise ConfigError(
            f"{run.path}: its model was not built from easier.models nor from --model "
            "module:callable (e.g. it came from a whole pickled --checkpoint), so `easier fold` "
            "cannot rebuild it. Rerun reduce with --model module:callable, or fold in Python: "
            "easier.fold(easier.load_model(RUN/model.pt, model=BASE).eval(), x)")
    with lock_run_dir(run.path):
        out = fold_run(args.run_dir, FoldOptions(args.plan, args.plan_batch, args.torchscript,
                                                 args.onnx), model=base)
    print(f"fold (plan={args.plan}): max |error| {out['plan']['max_abs_error']:.2g}")
    print(out["table"])
    print(f"wrote {', '.join(out['files'])}, fold_plan.json, fold_measure.json, fold.md to "
          f"{args.run_dir} (load: easier.io.artifacts.load_folded(RUN), which never runs "
          "pickled code; torch.export.load(path).module() for files you trust)")
    return 0


def trust_model_code(config: Path, cfg: dict[str, Any], spec: str, given: str | None) -> None:
    """Refuse to import the code a run's config.json names unless this command line names the
    same code (``--model``): a run directory is data that people copy and download, and a
    planted config.json must not make ``easier fold`` run a file of its choosing."""
    from easier.cli.user import is_callable_spec, model_file

    if not isinstance(spec, str) or not is_callable_spec(spec):
        return  # a registry name (easier.models, torchvision:, timm:) imports no user code
    named = {s for s in (cfg.get("model"), cfg.get("model_file"), spec) if isinstance(s, str)}
    if given is not None and (given in named or model_file(given) in named):
        return
    where = spec.rpartition(":")[0]
    why = (f"--model {given} is not the code it names" if given is not None else
           "a run directory's config.json alone never makes easier import code")
    raise ConfigError(
        f"{config} names the model code {spec!r} ({where}): {why}. If you trust that file, "
        f"repeat it on the command line: easier fold {config.parent} --model {spec}")


def cmd_list(what: str) -> int:
    if what == "models":
        from easier.models import list_models

        lines = [*list_models(), "torchvision:NAME, timm:NAME (when installed)",
                 "module.path:callable or path/to/file.py:callable (your own)"]
    elif what == "datasets":
        from easier.data import dataset_forms

        forms = [*dataset_forms(), ("module.path:callable", "your own: returns (train, val) "
                                    "or (train, val, test); also path/to/file.py:callable")]
        width = max(len(f) for f, _ in forms)
        lines = [f"{f:<{width}}  {h}" for f, h in forms]
    else:
        from easier.methods import method_descriptions

        # the paper's method is the default; probe removed the most on real data (docs/FMNIST.md)
        marks = {DEFAULT_METHOD: " [default]", RECOMMENDED_METHOD: " [recommended]"}
        named = method_descriptions()
        width = max(map(len, named))
        lines = [f"{n:<{width}}  {d}{marks.get(n, '')}" for n, d in named.items()]
    print("\n".join(lines))
    return 0
