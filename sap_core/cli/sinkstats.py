"""``sinkscope sinkstats``: do DLM sinks move more than AR sinks? Statistics over many prompts."""

from __future__ import annotations

import os
import sys

from sap_core.cli import common
from sap_core.errors import SapError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sinkstats",
        help="do DLM sinks move more than AR sinks? statistics over many prompts",
        description="Decode N prompts (windows of the evaluation text, or --prompt-file: one prompt a line) "
        "with a masked-diffusion and a causal model under the same decoding settings and report, "
        "per layer and over all layers, mean ± standard error of the dominant-position variance, "
        "the number of distinct dominant positions, the share of steps whose dominant position is "
        "the first token and the top-k mass share, with the paired difference DLM - AR.",
    )
    p.add_argument(
        "--models",
        type=common.names,
        default=["tiny-dlm", "tiny-ar"],
        help="two models, one masked-diffusion and one causal (default tiny-dlm,tiny-ar)",
    )
    p.add_argument("--prompts", type=common.positive, default=32, help="number of prompts, >= 2 (default 32)")
    p.add_argument("--prompt-file", default=None, help="UTF-8 file, one prompt a line (default: windows of the evaluation text)")
    p.add_argument("--prompt-tokens", type=common.positive, default=16, help="tokens per evaluation-text window (default 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:0 ... (default: auto)")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weights dtype (default: auto)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--threads",
        type=common.positive,
        default=int(os.environ.get("SINKSCOPE_THREADS", "1")),
        help="CPU threads for torch (default $SINKSCOPE_THREADS or 1: the tiny models gain nothing from more)",
    )
    common.add_decode(p)
    common.add_sink(p)
    g = p.add_argument_group(
        "did pruning move the sinks? (with --variant or --methods: the first of --models, dense against each variant)"
    )
    g.add_argument("--variant", nargs="+", default=(), metavar="DIR", help="saved variants (prune --save) of the first model")
    g.add_argument(
        "--methods", type=common.names, default=None, help="prune on the fly with these methods, e.g. wanda,sink_wanda"
    )
    g.add_argument("--sparsity", type=common.fraction, default=0.5, help="sparsity of --methods (default 0.5)")
    g.add_argument(
        "--compare",
        choices=["replayed", "free-running"],
        default="replayed",
        help="replayed: the variant reads the dense run's input at every step (default); free-running: each decodes itself",
    )
    common.add_ablation(p, "--ablate")
    g = p.add_argument_group("with --ablate: perplexity windows and task documents (both models, plain and ablated)")
    g.add_argument("--windows", type=common.positive, default=16, help="perplexity windows of 128 tokens (default 16)")
    g.add_argument("--docs", type=int, default=40, help="documents of the built-in task sinkscope_nextline (default 40; 0: none)")
    p.add_argument(
        "--out",
        default=None,
        metavar="CSV|JSON",
        help="write the results (.csv: summary + <stem>.prompts.csv; .json: everything); default: JSON summary to stdout",
    )
    p.set_defaults(func=cmd_sinkstats)


def cmd_sinkstats(args) -> int:
    if len(args.models) != 2:
        raise SapError(f"--models takes two models, one masked-diffusion and one causal (got {len(args.models)}).")
    prompt_text = common.read_text(args.prompt_file)  # a wrong path fails before torch is imported
    if args.prompt:
        raise SapError("sinkstats runs many prompts: give --prompt-file (one prompt a line) instead of --prompt.")
    # lazy: --help must not import torch
    import torch

    from sap_core.models import load_model
    from sap_core.sinkstats import evaluation_prompts, prompts_from_lines, run_sinkstats

    torch.set_num_threads(args.threads)
    decode, sink = common.decode_spec(args), common.sink_spec(args)
    if args.ablate:
        return cmd_ablate(args, sink)
    if args.variant or args.methods:
        return cmd_shift(args, decode, sink, prompt_text)
    handles = [load_model(m, device=args.device, dtype=args.dtype) for m in args.models]
    if prompt_text is not None:
        prompts = prompts_from_lines(prompt_text, args.prompts)
    else:
        prompts = evaluation_prompts(handles[0], args.prompts, args.prompt_tokens)
    with common.Bar("sinkstats", not args.quiet) as bar:
        stats = run_sinkstats(*handles, prompts, decode, sink, labels=args.models, progress=bar)
    print(f"{stats.n_prompts} prompts x 2 models in {stats.seconds:.1f} s", file=sys.stderr)
    if args.out:
        for path in stats.save(args.out):
            print(f"wrote {path}", file=sys.stderr)
        return 0
    doc = stats.to_dict()
    del doc["per_prompt"]
    common.write_json(doc, None)
    return 0


def cmd_ablate(args, sink) -> int:
    """``--ablate``: perplexity and the built-in task's accuracy of both models, with and without their sinks."""
    # lazy: --help must not import torch
    from sap_core.ablation_stats import run_ablation
    from sap_core.evaluate import EvalSpec
    from sap_core.lmeval.accuracy import TaskAccuracy
    from sap_core.lmeval.tasks import BUILTIN_TASK
    from sap_core.models import load_model

    if args.docs < 0:
        raise SapError(f"--docs must be >= 0 (got {args.docs}); 0 scores no task.")
    ablation = common.ablation(args, sink)
    accuracy = TaskAccuracy(BUILTIN_TASK, limit=args.docs) if args.docs else None
    handles = [load_model(m, device=args.device, dtype=args.dtype) for m in args.models]
    with common.Bar("ablation", not args.quiet) as bar:
        result = run_ablation(handles, ablation, EvalSpec(nsamples=args.windows), accuracy, progress=bar)
    print(result.table().to_string(index=False), file=sys.stderr)
    common.write_json(result.to_dict(), args.out)
    return 0


def cmd_shift(args, decode, sink, prompt_text) -> int:
    """``--variant`` / ``--methods``: the dense first model against each variant, over the prompts."""
    # lazy: --help must not import torch
    from sap_core.lmeval.model import load_variant
    from sap_core.models import load_model
    from sap_core.pruning import PruneSpec, prune
    from sap_core.sink_shift import run_shift_stats
    from sap_core.sinkstats import evaluation_prompts, prompts_from_lines

    handle = load_model(args.models[0], device=args.device, dtype=args.dtype)
    specs = [PruneSpec(method=m, sparsity=args.sparsity) for m in args.methods or ()]  # bad names: one line now
    variants = {}
    for d in args.variant:
        v = load_variant(handle, d)
        variants[v.label if v.label not in variants else f"{v.label} ({d})"] = v
    prompts = (
        prompts_from_lines(prompt_text, args.prompts)
        if prompt_text
        else evaluation_prompts(handle, args.prompts, args.prompt_tokens)
    )
    for spec in specs:
        variants[spec.label] = prune(handle, spec)
    with common.Bar("sink shift", not args.quiet) as bar:
        stats = run_shift_stats(handle, variants, prompts, decode, sink, args.compare, progress=bar)
    print(
        f"{stats.n_prompts} prompts x {len(variants)} variants ({args.compare}) in {stats.seconds:.1f} s; "
        f"variant passes / dense generations: {stats.variant_seconds / len(variants) / stats.dense_seconds:.2f}",
        file=sys.stderr,
    )
    print(stats.table().to_string(index=False), file=sys.stderr)
    if args.out:
        common.write_json(stats.to_dict(), args.out)
        return 0
    doc = stats.to_dict()
    del doc["per_prompt"]
    common.write_json(doc, None)
    return 0
