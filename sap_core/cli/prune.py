"""``sinkscope prune``: prune a model with one method at one sparsity and save the variant."""

from __future__ import annotations

import dataclasses
import sys

from sap_core.cli import common
from sap_core.pruning.spec import METHODS, SPARSEGPT_SELECTIONS  # the method table; light (no torch)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a model and save the variant",
        description="Prune --model with one method at one sparsity. --save DIR writes a model directory "
        "that every subcommand accepts as --model; the JSON report gives per-layer sparsity and timing.",
    )
    common.add_model(p)
    p.add_argument(
        "--method",
        default="wanda",
        choices=list(METHODS),
        metavar="METHOD",
        help="pruning method (default wanda): " + "; ".join(f"{m}: {d}" for m, d in METHODS.items()),
    )
    p.add_argument("--sparsity", type=common.fraction, default=0.5, help="fraction of weights to remove (default 0.5)")
    p.add_argument("--pattern", default="unstructured", help="unstructured or N:M, e.g. 2:4 (default unstructured)")
    p.add_argument(
        "--heads",
        type=common.fraction,
        default=0.0,
        help="structured methods: fraction of each block's attention heads removed (default 0; LLaDA without GQA only)",
    )
    p.add_argument(
        "--bias-compensation",
        action="store_true",
        help="FLAP methods: add the removed channels' mean output to the output projection's bias (needs a bias there)",
    )
    common.add_sink(p)
    common.add_calibration(p)
    p.add_argument(
        "--sparsegpt-selection",
        choices=list(SPARSEGPT_SELECTIONS),
        default=None,
        help="how the SparseGPT family picks an unstructured mask: per_row (default, the project's) or official "
        "(the reference code's per-column-block threshold; the default of --preset official)",
    )
    p.add_argument(
        "--preset",
        choices=["official"],
        default=None,
        help="official: the reference code's settings (128 calibration windows of the model's whole context, "
        "4096 tokens for Dream; the family's forward process; official sink rule, SparseGPT's reference mask "
        "selection); not combinable with --calib-*/--sink-*",
    )
    p.add_argument(
        "--save",
        default=None,
        metavar="DIR",
        help="write the pruned model directory here (never the "
        "--model directory; a non-empty directory only if it is a variant and --overwrite is given)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the variant already saved in --save DIR")
    p.add_argument("--out", default=None, metavar="JSON", help="write the JSON report here (default: stdout)")
    p.set_defaults(func=cmd_prune)


def cmd_prune(args) -> int:
    # lazy: --help must not import torch
    from sap_core.pruning import PruneSpec, check_sparsity, prune

    spec = PruneSpec(
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        sink=common.sink_spec(args),
        calibration=common.calibration_spec(args),
        heads=args.heads,
        bias_compensation=args.bias_compensation,
        **({} if args.sparsegpt_selection is None else {"sparsegpt_selection": args.sparsegpt_selection}),
    )
    spec.validate()
    common.check_outputs(args)
    handle = common.load(args)
    if args.preset == "official":  # the official code's calibration over the model's whole context
        given = [k for k, v in vars(args).items() if k.startswith(("calib_", "sink_")) and v is not None]
        if given:
            raise common.UsageError(
                f"--preset official fixes the calibration and sink settings; drop "
                f"{', '.join('--' + k.replace('_', '-') for k in given)}."
            )
        spec = PruneSpec.official(args.method, args.sparsity, args.pattern, seqlen=handle.max_length, family=handle.family)
        spec = dataclasses.replace(spec, heads=args.heads, bias_compensation=args.bias_compensation)
        if args.sparsegpt_selection is not None:
            spec = dataclasses.replace(spec, sparsegpt_selection=args.sparsegpt_selection)
    if args.save:  # now with the loaded model's real directory
        # lazy: --help must not import torch
        from sap_core.pruning.variant import check_save_target

        check_save_target(args.save, handle, overwrite=args.overwrite)
    with common.Bar("prune", not args.quiet) as bar:
        variant = prune(handle, spec, progress=bar)
    saved = None
    if args.save:
        saved = str(variant.save(args.save, handle, overwrite=args.overwrite))
        print(f"wrote {saved}/ (load it with --model {saved})", file=sys.stderr)
    data = {
        "model": args.model,
        **variant.summary(),
        "saved_to": saved,
        "layer_sparsity": check_sparsity(variant, by="layer")[["block", "params", "zeros", "sparsity"]].to_dict(orient="records"),
        "module_sparsity": variant.layer_sparsity.to_dict(orient="records"),
    }
    common.write_json(data, args.out)
    return 0
