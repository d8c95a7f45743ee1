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
