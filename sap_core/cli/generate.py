"""``sinkscope generate``: decode a prompt (and compare models on it)."""

from __future__ import annotations

import sys

from sap_core.cli import common
from sap_core.errors import SapError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="decode a prompt and save the trajectory",
        description="Decode a prompt with the model family's own masked-diffusion sampler (--sampler: Dream's for Dream "
        "models, LLaDA's otherwise; token by token for a causal model). "
        "Prints/writes a JSON summary (text, timing); --trajectory saves the full record as .npz. "
        "--compare MODEL... decodes the same prompt with other models (e.g. pruned ones) and reports "
        "divergence step and per-position agreement.",
    )
    common.add_model(p)
    common.add_decode(p, prompt_required=True)
    p.add_argument(
        "--text-only",
        action="store_true",
        help="MMaDA: pick among text tokens only (default: over the whole vocabulary, image-codebook tokens included, as MMaDA's own sampler)",
    )
    p.add_argument("--record-attention", action="store_true", help="record attention mass per step (for analyze)")
    p.add_argument("--trajectory", default=None, metavar="NPZ", help="save the trajectory here (.npz)")
    p.add_argument(
        "--compare", nargs="+", default=None, metavar="MODEL", help="also decode with these models and compare to --model"
    )
    p.add_argument("--out", default=None, metavar="JSON", help="write the JSON summary here (default: stdout)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    # lazy: --help must not import torch
    from sap_core.attention import AttentionRecorder
    from sap_core.diffusion import generate

    spec = common.decode_spec(args)
    common.check_outputs(args)
    handle = common.load(args)
    if args.compare:
        return _compare(args, handle, spec)
    recorder = AttentionRecorder() if args.record_attention else None
    with common.Bar("generate", not args.quiet) as bar:
        traj = generate(handle, args.prompt, spec, recorder=recorder, progress=bar, allow_large_capture=args.allow_large_capture)
    if args.trajectory:
        args.trajectory = str(traj.save(args.trajectory))
        print(f"wrote {args.trajectory}", file=sys.stderr)
    common.write_json(
        {
            "model": args.model,
            "prompt": args.prompt,
            "text": handle.decode(traj.generated_ids),
            "generated_ids": traj.generated_ids,
            "spec": traj.spec,
            "note": traj.note,
            "n_steps": traj.n_steps,
            "seconds": float(traj.step_seconds.sum()),
            "mean_step_ms": 1000 * float(traj.step_seconds.mean()),
            "step_seconds": traj.step_seconds,
            "attention_recorded": traj.mass is not None,
            "trajectory": args.trajectory,
        },
        args.out,
    )
    return 0


def _compare(args, handle, spec) -> int:
    # lazy: --help must not import torch
    from sap_core.compare import compare_generations
    from sap_core.models import load_model

    others = {}
    for source in args.compare:
        other = load_model(source, device=args.device, dtype=args.dtype)
        if len(other.tokenizer) != len(handle.tokenizer) or other.mask_id != handle.mask_id:
            raise SapError(
                f"'{source}' has a different tokenizer from '{args.model}'; compare models of the same family and vocabulary."
            )
        label = source if source not in others else f"{source} ({len(others)})"
        others[label] = other
    with common.Bar("compare", not args.quiet) as bar:
        comparison = compare_generations(handle, others, args.prompt, spec, progress=bar)
    data = comparison.to_dict()
    data["model"] = args.model
    common.write_json(data, args.out)
    return 0
