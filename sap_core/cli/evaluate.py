"""``sinkscope evaluate``: perplexity of a model, or lm-eval accuracy with ``--tasks``."""

from __future__ import annotations

import argparse
import functools
import sys

from sap_core.cli import common


def _add_bench(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark accuracy (lm-evaluation-harness; with --tasks)")
    g.add_argument(
        "--tasks",
        type=common.names,
        default=None,
        help="comma-separated lm-eval tasks (the built-in one: sinkscope_nextline); scores accuracy instead of perplexity",
    )
    g.add_argument("--variant", nargs="+", default=(), metavar="DIR", help="saved variants (prune --save) of --model to compare")
    g.add_argument("--limit", type=common.positive, default=None, help="documents per task (default: all)")
    g.add_argument("--mc-num", type=common.positive, default=32, help="Monte Carlo rows per request, DLM only (default 32)")
    g.add_argument(
        "--mc-batch",
        type=common.positive,
        default=None,
        help="rows per stratified group; mc-num must be a multiple (default mc-num)",
    )
    g.add_argument("--cfg", type=float, default=0.0, help="unsupervised classifier-free guidance scale, DLM only (default 0)")
    g.add_argument(
        "--log-type",
        choices=("ftb", "btf", "union"),
        default="ftb",
        help="Dream's estimator: score the continuation (ftb), the context (btf) or both (union) (default ftb)",
    )
    g.add_argument("--include-path", default=None, metavar="DIR", help="a folder of extra lm-eval task YAML files")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="perplexity of a model, or benchmark accuracy with --tasks",
        description="Masked-diffusion Monte Carlo perplexity of a DLM (next-token perplexity of a causal model), "
        "with standard errors. Writes JSON. With --tasks: lm-eval accuracy of --model and every --variant on the "
        "same documents and Monte Carlo masks; --out X.json gets lm-eval's results and the table, X.csv the table "
        "(task, model, acc ± SE, delta vs dense ± paired SE).",
    )
    common.add_model(p)
    common.add_eval(p)
    _add_bench(p)
    common.add_sink(p)
    common.add_ablation(p, "--ablate-sinks")
    p.add_argument("--out", default=None, metavar="JSON", help="write the JSON here (default: stdout)")
    defaults = {dest: p.get_default(dest) for dest in PERPLEXITY_ONLY + ACCURACY_ONLY}
    p.set_defaults(func=functools.partial(cmd_evaluate, defaults=defaults))


PERPLEXITY_ONLY = ("text", "seqlen", "nsamples", "draws", "prefix")
ACCURACY_ONLY = ("variant", "limit", "mc_num", "mc_batch", "cfg", "log_type", "include_path")


def check_options(args, defaults: dict) -> None:
    """Refuse options of the other mode (perplexity's with --tasks, accuracy's without): they would do nothing."""
    unused = PERPLEXITY_ONLY if args.tasks else ACCURACY_ONLY
    given = ["--" + d.replace("_", "-") for d in unused if getattr(args, d) != defaults[d]]
    if not given:
        return
    names, one = ", ".join(given), len(given) == 1
    if args.tasks:
        raise common.UsageError(
            f"{names} {'is a perplexity option' if one else 'are perplexity options'}, which --tasks (accuracy) does not "
            f"use: drop {'it' if one else 'them'} (accuracy takes --limit, --mc-num, --mc-batch, --cfg, --log-type, --eval-seed, --estimator, --nll-type), "
            "or drop --tasks for perplexity."
        )
    raise common.UsageError(
        f"{names} {'is' if one else 'are'} for benchmark accuracy and only used with --tasks: add --tasks, or drop "
        f"{'it' if one else 'them'}."
    )


def cmd_accuracy(args) -> int:
    # lazy: lm-eval is optional and heavy, and --help must not import torch
    from sap_core.lmeval.accuracy import accuracy_table, format_table, save_accuracy
    from sap_core.lmeval.model import BenchSpec, load_variant
    from sap_core.lmeval.tasks import load_tasks, manager_for

    spec = BenchSpec(
        mc_num=args.mc_num,
        batch_size=args.mc_batch or args.mc_num,
        cfg=args.cfg,
        seed=args.eval_seed,
        estimator=args.estimator,
        nll_type=args.nll_type,
        log_type=args.log_type,
    )
    common.check_outputs(args)
    load_tasks(args.tasks, manager_for(args.tasks, args.include_path))  # before the model loads
    handle = common.load(args)
    variants = {}
    for d in args.variant:
        v = load_variant(handle, d)
        variants[v.label if v.label not in variants else f"{v.label} ({d})"] = v
    with common.Bar("accuracy", not args.quiet) as bar:
        result = accuracy_table(
            handle, variants, args.tasks, spec, limit=args.limit, include_path=args.include_path, progress=bar
        )
    if args.out:
        out, csv = save_accuracy(result, args.out)
        print(f"wrote {out} and {csv}", file=sys.stderr)
    else:
        print(result.to_json())
    if not args.quiet:
        print(format_table(result.table).to_string(index=False), file=sys.stderr)
    return 0


def cmd_ablate(args) -> int:
    """``--ablate-sinks``: perplexity (and the first --tasks task's accuracy) with and without the sinks, paired."""
    # lazy: --help must not import torch
    from sap_core.ablation_stats import run_ablation
    from sap_core.lmeval.accuracy import TaskAccuracy
    from sap_core.text import check_length

    if args.variant:
        raise common.UsageError("--ablate-sinks scores --model itself; drop --variant.")
    ablation, spec = common.ablation(args), common.eval_spec(args)
    accuracy = TaskAccuracy(args.tasks[0], limit=args.limit, mc_num=args.mc_num, seed=args.eval_seed) if args.tasks else None
    common.check_outputs(args)
    handle = common.load(args)
    check_length(handle, spec.seqlen, "--seqlen")
    with common.Bar("ablation", not args.quiet) as bar:
        result = run_ablation([handle], ablation, spec, accuracy, progress=bar)
    common.write_json(result.to_dict(), args.out)
    if not args.quiet:
        print(result.table().to_string(index=False), file=sys.stderr)
    return 0


def cmd_evaluate(args, defaults: dict) -> int:
    # lazy: --help must not import torch
    from sap_core.estimator import family_estimator
    from sap_core.evaluate import Perplexity
    from sap_core.text import check_length

    if args.ablate:
        return cmd_ablate(args)
    check_options(args, defaults)
    if args.tasks:
        return cmd_accuracy(args)

    spec = common.eval_spec(args)
    metric = Perplexity(spec)
    metric.validate()
    common.check_outputs(args)
    handle = common.load(args)
    check_length(handle, spec.seqlen, "--seqlen")
    with common.Bar("perplexity", not args.quiet) as bar:
        row = metric.score(handle, progress=bar).columns
    common.write_json(
        {
            "model": args.model,
            "kind": "causal" if handle.causal else "masked-diffusion",
            "ppl": row["ppl"],
            "ppl_se": row["ppl_se"],
            "nll": row["nll"],
            "nll_se": row["nll_se"],
            "seconds": row["eval_seconds"],
            "seqlen": spec.seqlen,
            "nsamples": spec.nsamples,
            "draws": None if handle.causal else spec.draws,
            "seed": None if handle.causal else spec.seed,
            "estimator": None if handle.causal else spec.estimator or family_estimator(handle.family),
            "nll_type": None if handle.causal else spec.nll_type,
            "prefix": spec.prefix,
            "text": args.text or "built-in",
        },
        args.out,
    )
    return 0
