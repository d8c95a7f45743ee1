"""The SinkScope command line: ``python -m sap_core generate|analyze|prune|evaluate|sweep``.

Every subcommand loads ``--model`` (a built-in name or a model directory, including one written by
``prune --save``), shows tqdm progress bars on stderr for long work, and writes JSON (or CSV for
sweeps) that loads back: to ``--out`` when given, else JSON to stdout. User errors (bad options,
missing files, impossible specs) print one line ``error: <message>`` to stderr and exit with status 2;
Ctrl-C exits with 130.

Heavy imports (torch, transformers) happen inside the handlers so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
DEFAULT_PROMPT = "To be, or not to be, that is the question:"


class UsageError(Exception):
    """A bad command line (raised by the parser instead of printing usage and exiting)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse hook
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --- progress ---------------------------------------------------------------------------------------


class Bar:
    """A ``progress(done, total, message)`` callback drawing tqdm bars on stderr.

    A new bar starts whenever ``total`` changes or ``done`` goes backwards (a new phase of a job).
    """

    def __init__(self, desc: str, enabled: bool = True):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None or self.bar.total != total or done < self.bar.n:
            self.close()
            self.bar = tqdm(total=total, desc=self.desc, file=sys.stderr, dynamic_ncols=True, leave=False)
        if message:
            self.bar.set_postfix_str(message[:60], refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- shared helpers ---------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _fraction(text: str) -> float:
    from sap_core.errors import SapError
    from sap_core.pruning.spec import check_sparsity

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got '{text}'") from None
    try:
        return check_sparsity(value)
    except SapError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}") from None


def _taus(text: str) -> tuple[float, ...]:
    from sap_core.errors import SapError
    from sap_core.sinks import parse_taus

    try:
        return parse_taus(text)
    except SapError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _read_text(path: str | None) -> str | None:
    if path is None:
        return None
    from sap_core.errors import SapError

    p = Path(path)
    if not p.is_file():
        raise SapError(f"No text file at '{path}'; give a UTF-8 text file.")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SapError(f"'{path}' is not UTF-8 text ({exc.reason}).") from None


def _jsonable(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return _jsonable(asdict(obj))
    return obj


def _write_json(data: dict, out: str | None) -> None:
    text = json.dumps(_jsonable(data), indent=2)
    if out is None:
        print(text)
        return
    from sap_core.files import atomic_write_text

    path = atomic_write_text(out, text + "\n")
    print(f"wrote {path}", file=sys.stderr)


def _check_outputs(args) -> None:
    """Every output path of the command can be written: checked before any model is loaded or work done."""
    from types import SimpleNamespace

    from sap_core.files import check_output_dir, check_output_file

    if getattr(args, "out", None):
        check_output_file(args.out, "--out")
    if getattr(args, "trajectory", None) and args.command == "generate":
        from sap_core.diffusion import npz_path

        check_output_file(npz_path(args.trajectory), "--trajectory")
    if getattr(args, "csv", None):
        check_output_dir(args.csv, "--csv")
    if getattr(args, "plot", None):
        check_output_file(args.plot, "--plot")
    if getattr(args, "save", None):
        from sap_core.pruning.variant import check_save_target

        check_save_target(args.save, SimpleNamespace(source=args.model), overwrite=args.overwrite)


def _prompt(args) -> str | None:
    """The --prompt text; refuses bytes that are not UTF-8 (the shell passes them as surrogate escapes)."""
    if args.prompt is None:
        return None
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        from sap_core.errors import SapError

        raise SapError(f"--prompt is not UTF-8 text (character {exc.start}); give UTF-8 text.") from None
    return args.prompt


def _load(args):
    from transformers.utils import logging as hf_logging

    from sap_core.models import load_model

    hf_logging.set_verbosity_error()  # e.g. the tokenizer's "longer than max length" note on whole texts

    return load_model(args.model, device=args.device, dtype=args.dtype)


def _decode_spec(args):
    from sap_core.diffusion import DecodeSpec

    _prompt(args)
    return DecodeSpec(
        gen_length=args.gen_length,
        steps=args.steps,
        block_length=args.block_length,
        remasking=args.remasking,
        temperature=args.temperature,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
    )


def _sink_spec(args):
    from sap_core.sinks import SinkSpec

    given = {name: getattr(args, f"sink_{name}") for name in SINK_OPTIONS if getattr(args, f"sink_{name}", None) is not None}
    return SinkSpec(**given)


def _calibration_spec(args):
    from sap_core.pruning import CalibrationSpec

    given = {
        name: getattr(args, f"calib_{name}")
        for name in ("nsamples", "seqlen", "seed", "batch_size")
        if getattr(args, f"calib_{name}") is not None
    }
    return CalibrationSpec(text=_read_text(args.calib_text), **given)


def _eval_spec(args):
    from sap_core.sweep import EvalSpec

    return EvalSpec(
        seqlen=args.seqlen,
        nsamples=args.nsamples,
        draws=args.draws,
        seed=args.eval_seed,
        text=_read_text(args.text),
        prefix=args.prefix,
        metric=getattr(args, "metric", "ppl"),
        limit=getattr(args, "limit", None),
        mc_num=getattr(args, "mc_num", 32),
    )


# --- options ----------------------------------------------------------------------------------------


def _indices(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


# SinkSpec fields exposed as --sink-<name> (None: keep SinkSpec's default, which is the official rule).
SINK_OPTIONS: dict[str, tuple[Any, str]] = {
    "rule": (str, "official (sigmoid score) or leave_one_out (default official)"),
    "k": (float, "official rule: sink when mass > mean + k*std (default 2)"),
    "alpha": (float, "official rule: sigmoid slope of the sink score (default 5)"),
    "epsilon": (float, "leave_one_out rule: margin in units of the uniform mass (default 0.5)"),
    "tau": (
        float,
        "variance gate: a sink is unstable when its score variance >= tau (default 0 = every sink; used by the gated_* methods)",
    ),
    "stable_min_frequency": (float, "a stable sink is a sink at least this share of steps (default 0.5)"),
    "normalize": (str, "mass view scored: raw, uniform, per_query, expected (default raw)"),
    "layers": (_indices, "comma-separated layer indices to sum over (default all)"),
    "heads": (_indices, "comma-separated head indices to sum over (default all)"),
    "top_k": (int, "positions counted by the top-k mass share (default 4)"),
}


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny-dlm", help="built-in name (tiny-dlm, tiny-ar) or model directory (default: tiny-dlm)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:0 ... (default: auto)")
    g.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weights dtype (default: auto)"
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_decode(p: argparse.ArgumentParser, prompt_required: bool = False) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument(
        "--prompt",
        default=None if not prompt_required else DEFAULT_PROMPT,
        help=f"prompt text (default: '{DEFAULT_PROMPT}')" if prompt_required else "prompt text",
    )
    g.add_argument("--gen-length", type=int, default=32, help="tokens to generate (default 32)")
    g.add_argument("--steps", type=int, default=32, help="denoising steps (default 32)")
    g.add_argument("--block-length", type=int, default=16, help="semi-autoregressive block length (default 16)")
    g.add_argument(
        "--remasking", default="low_confidence", choices=["low_confidence", "random", "entropy"]
    )  # sap_core.diffusion.REMASKING, kept literal for a fast --help
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    g.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance scale (default 0 = off)")
    g.add_argument("--seed", type=int, default=0, help="decoding seed (default 0)")
    g.add_argument(
        "--allow-large-capture",
        action="store_true",
        help="record attention even when the record's estimate exceeds the free memory (default: refuse)",
    )


def _add_sink(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sink detection (defaults: sap_core.sinks.SinkSpec)")
    for name, (typ, text) in SINK_OPTIONS.items():
        g.add_argument(
            f"--sink-{name.replace('_', '-')}",
            dest=f"sink_{name}",
            type=typ,
            default=None,
            help=text,
            metavar="LIST" if name in ("layers", "heads") else "X",
        )


def _add_calibration(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib-text", default=None, help="UTF-8 text file to calibrate on (default: built-in calibration text)")
    g.add_argument("--calib-nsamples", type=_positive, default=None, help="calibration windows (default: CalibrationSpec's, 16)")
    g.add_argument(
        "--calib-seqlen", type=_positive, default=None, help="tokens per calibration window (default: CalibrationSpec's, 128)"
    )
    g.add_argument("--calib-seed", type=int, default=None, help="calibration seed (default 0)")
    g.add_argument("--calib-batch-size", type=_positive, default=None, help="sequences per forward pass (speed only; default 10)")


def _add_eval(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("perplexity")
    g.add_argument("--text", default=None, help="UTF-8 text file to score (default: built-in evaluation text)")
    g.add_argument("--seqlen", type=_positive, default=128, help="tokens per window, prefix included (default 128)")
    g.add_argument("--nsamples", type=_positive, default=16, help="windows, evenly spread over the text (default 16)")
    g.add_argument("--draws", type=_positive, default=8, help="masking draws per window, >= 2, DLM only (default 8)")
    g.add_argument(
        "--prefix",
        default=None,
        help="conditioning text before every window, never scored (a causal model needs one when its tokenizer adds no BOS)",
    )
    g.add_argument("--eval-seed", type=int, default=0, help="seed of the masking draws (default 0)")


def _add_bench(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark accuracy (lm-evaluation-harness; with --tasks)")
    g.add_argument(
        "--tasks",
        type=_names,
        default=None,
        help="comma-separated lm-eval tasks (the built-in one: sinkscope_nextline); scores accuracy instead of perplexity",
    )
    g.add_argument("--variant", nargs="+", default=(), metavar="DIR", help="saved variants (prune --save) of --model to compare")
    g.add_argument("--limit", type=_positive, default=None, help="documents per task (default: all)")
    g.add_argument("--mc-num", type=_positive, default=32, help="Monte Carlo rows per request, DLM only (default 32)")
    g.add_argument(
        "--mc-batch", type=_positive, default=None, help="rows per stratified group; mc-num must be a multiple (default mc-num)"
    )
    g.add_argument("--cfg", type=float, default=0.0, help="unsupervised classifier-free guidance scale, DLM only (default 0)")
    g.add_argument("--include-path", default=None, metavar="DIR", help="a folder of extra lm-eval task YAML files")


def build_parser() -> Parser:
    from sap_core.pruning.spec import METHODS, SPARSEGPT_SELECTIONS  # the method table; light (no torch)

    parser = Parser(
        prog="sinkscope" if Path(sys.argv[0]).name == "sinkscope" else "python -m sap_core",
        description="SinkScope: attention sinks and sink-aware pruning of diffusion language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)  # its metavar lists every subcommand, set at the end

    p = sub.add_parser(
        "generate",
        help="decode a prompt and save the trajectory",
        description="Decode a prompt with the masked-diffusion sampler (token by token for a causal model). "
        "Prints/writes a JSON summary (text, timing); --trajectory saves the full record as .npz. "
        "--compare MODEL... decodes the same prompt with other models (e.g. pruned ones) and reports "
        "divergence step and per-position agreement.",
    )
    _add_model(p)
    _add_decode(p, prompt_required=True)
    p.add_argument("--record-attention", action="store_true", help="record attention mass per step (for analyze)")
    p.add_argument("--trajectory", default=None, metavar="NPZ", help="save the trajectory here (.npz)")
    p.add_argument(
        "--compare", nargs="+", default=None, metavar="MODEL", help="also decode with these models and compare to --model"
    )
    p.add_argument("--out", default=None, metavar="JSON", help="write the JSON summary here (default: stdout)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "analyze",
        help="sink analysis of a trajectory",
        description="Detect attention sinks in a trajectory (--trajectory NPZ recorded with --record-attention) "
        "or in a fresh generation of --prompt. Prints a JSON summary; --out writes the full report as JSON, "
        "--csv DIR its tables (positions, steps, layers, scores) as CSV.",
    )
    _add_model(p)
    _add_decode(p)
    p.add_argument(
        "--trajectory", default=None, metavar="NPZ", help="trajectory saved by 'generate --record-attention --trajectory'"
    )
    _add_sink(p)
    p.add_argument("--out", default=None, metavar="JSON", help="write the full report as JSON (SinkReport.from_json loads it)")
    p.add_argument("--csv", default=None, metavar="DIR", help="write the report tables as CSV files into DIR")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser(
        "prune",
        help="prune a model and save the variant",
        description="Prune --model with one method at one sparsity. --save DIR writes a model directory "
        "that every subcommand accepts as --model; the JSON report gives per-layer sparsity and timing.",
    )
    _add_model(p)
    p.add_argument(
        "--method",
        default="wanda",
        choices=list(METHODS),
        metavar="METHOD",
        help="pruning method (default wanda): " + "; ".join(f"{m}: {d}" for m, d in METHODS.items()),
    )
    p.add_argument("--sparsity", type=_fraction, default=0.5, help="fraction of weights to remove (default 0.5)")
    p.add_argument("--pattern", default="unstructured", help="unstructured or N:M, e.g. 2:4 (default unstructured)")
    p.add_argument(
        "--heads",
        type=_fraction,
        default=0.0,
        help="structured methods: fraction of each block's attention heads removed (default 0; LLaDA without GQA only)",
    )
    p.add_argument(
        "--bias-compensation",
        action="store_true",
        help="FLAP methods: add the removed channels' mean output to the output projection's bias (needs a bias there)",
    )
    _add_sink(p)
    _add_calibration(p)
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
        "official sink rule, SparseGPT's reference mask selection); not combinable with --calib-*/--sink-*",
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

    p = sub.add_parser(
        "evaluate",
        help="perplexity of a model, or benchmark accuracy with --tasks",
        description="Masked-diffusion Monte Carlo perplexity of a DLM (next-token perplexity of a causal model), "
        "with standard errors. Writes JSON. With --tasks: lm-eval accuracy of --model and every --variant on the "
        "same documents and Monte Carlo masks; --out X.json gets lm-eval's results and the table, X.csv the table "
        "(task, model, acc ± SE, delta vs dense ± paired SE).",
    )
    _add_model(p)
    _add_eval(p)
    _add_bench(p)
    p.add_argument("--out", default=None, metavar="JSON", help="write the JSON here (default: stdout)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "sweep",
        help="perplexity over methods x sparsities x patterns",
        description="Prune with every method at every sparsity and pattern, score each by perplexity, and "
        "write a CSV (method, sparsity, pattern, ppl, ppl_se, prune_seconds, ...) with the dense "
        "model as the first row. --plot PNG draws it (plotly + kaleido).",
    )
    _add_model(p)
    p.add_argument(
        "--methods", type=_names, default=["magnitude", "wanda"], help="comma-separated methods (default magnitude,wanda)"
    )
    p.add_argument("--sparsities", type=_floats, default=[0.3, 0.5, 0.7], help="comma-separated sparsities (default 0.3,0.5,0.7)")
    p.add_argument("--patterns", type=_names, default=["unstructured"], help="comma-separated patterns (default unstructured)")
    _add_sink(p)
    p.add_argument(
        "--sink-taus",
        type=_taus,
        default=(),
        metavar="LIST",
        help="comma-separated taus, e.g. 0,0.01,0.02,0.05,0.1: one row per tau for each gated_* method "
        "(default: --sink-tau alone), plus the method's ungated twin (sink_wanda, sink_sparsegpt: the official rule) "
        "as the reference",
    )
    p.add_argument(
        "--heads",
        type=_fraction,
        default=0.0,
        metavar="F",
        help="fraction of each block's attention heads the structured methods (struct_wanda, flap, their sink-aware "
        "variants) also remove (default 0: MLP channels only; LLaDA without GQA only)",
    )
    _add_calibration(p)
    _add_eval(p)
    p.add_argument(
        "--out",
        default="sweep.csv",
        metavar="CSV",
        help="CSV to write (default sweep.csv); the per-draw estimates go to <name>.estimates.npz beside it, "
        "finished rows to <name>.partial.csv while the sweep runs",
    )
    p.add_argument("--plot", default=None, metavar="PNG", help="also save the perplexity-vs-sparsity plot (PNG/SVG/PDF)")
    p.add_argument(
        "--plot-view",
        choices=("delta", "absolute"),
        default="delta",
        help="delta (default): change of perplexity against the dense model with ±2 paired SE of the difference; "
        "absolute: perplexity with each row's own ±1 SE (unpaired)",
    )
    g = p.add_argument_group("accuracy (with --metric acc:TASK)")
    g.add_argument(
        "--metric", default="ppl", help="ppl (default) or acc:TASK: also lm-eval accuracy on TASK (columns acc, acc_se, acc_task)"
    )
    g.add_argument("--limit", type=_positive, default=None, help="documents of TASK (default: all)")
    g.add_argument("--mc-num", type=_positive, default=32, help="Monte Carlo rows per request, DLM only (default 32)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip the jobs whose rows are already in <out>.partial.csv (from an interrupted run of the same sweep)",
    )
    p.add_argument(
        "--executor",
        choices=["serial", "ray"],
        default="serial",
        help="serial (default: one job after the other in this process) or ray (jobs spread over Ray workers; same rows)",
    )
    p.add_argument(
        "--address",
        default=None,
        metavar="HOST:PORT",
        help="with --executor ray: join this Ray cluster (started with 'ray start --head'); default: start Ray on this machine",
    )
    p.add_argument("--workers", type=int, default=2, metavar="N", help="with --executor ray: number of workers (default 2)")
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        metavar="G",
        help="with --executor ray: GPUs per worker (default 0: CPU workers); > 0 loads the model on CUDA in each worker",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=int,
        default=1,
        metavar="C",
        help="with --executor ray: CPUs (and torch threads) per worker (default 1)",
    )
    p.set_defaults(func=cmd_sweep)
    _add_animate(sub)

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
        type=_names,
        default=["tiny-dlm", "tiny-ar"],
        help="two models, one masked-diffusion and one causal (default tiny-dlm,tiny-ar)",
    )
    p.add_argument("--prompts", type=_positive, default=32, help="number of prompts, >= 2 (default 32)")
    p.add_argument("--prompt-file", default=None, help="UTF-8 file, one prompt a line (default: windows of the evaluation text)")
    p.add_argument("--prompt-tokens", type=_positive, default=16, help="tokens per evaluation-text window (default 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:0 ... (default: auto)")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weights dtype (default: auto)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--threads",
        type=_positive,
        default=int(os.environ.get("SINKSCOPE_THREADS", "1")),
        help="CPU threads for torch (default $SINKSCOPE_THREADS or 1: the tiny models gain nothing from more)",
    )
    _add_decode(p)
    _add_sink(p)
    p.add_argument(
        "--out",
        default=None,
        metavar="CSV|JSON",
        help="write the results (.csv: summary + <stem>.prompts.csv; .json: everything); default: JSON summary to stdout",
    )
    p.set_defaults(func=cmd_sinkstats)
    sub.metavar = "{" + ",".join(sub.choices) + "}"  # every subcommand on the usage line
    return parser


# --- subcommands ------------------------------------------------------------------------------------


def cmd_generate(args) -> int:
    from sap_core.attention import AttentionRecorder
    from sap_core.diffusion import generate

    spec = _decode_spec(args)
    _check_outputs(args)
    handle = _load(args)
    if args.compare:
        return _compare(args, handle, spec)
    recorder = AttentionRecorder() if args.record_attention else None
    with Bar("generate", not args.quiet) as bar:
        traj = generate(handle, args.prompt, spec, recorder=recorder, progress=bar, allow_large_capture=args.allow_large_capture)
    if args.trajectory:
        args.trajectory = str(traj.save(args.trajectory))
        print(f"wrote {args.trajectory}", file=sys.stderr)
    _write_json(
        {
            "model": args.model,
            "prompt": args.prompt,
            "text": handle.decode(traj.generated_ids),
            "generated_ids": traj.generated_ids,
            "spec": spec,
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
    from sap_core.compare import compare_generations
    from sap_core.models import load_model

    others = {}
    for source in args.compare:
        other = load_model(source, device=args.device, dtype=args.dtype)
        if len(other.tokenizer) != len(handle.tokenizer) or other.mask_id != handle.mask_id:
            from sap_core.errors import SapError

            raise SapError(
                f"'{source}' has a different tokenizer from '{args.model}'; compare models of the same family and vocabulary."
            )
        label = source if source not in others else f"{source} ({len(others)})"
        others[label] = other
    with Bar("compare", not args.quiet) as bar:
        comparison = compare_generations(handle, others, args.prompt, spec, progress=bar)
    data = comparison.to_dict()
    data["model"] = args.model
    _write_json(data, args.out)
    return 0


def cmd_analyze(args) -> int:
    from sap_core.errors import SapError

    # Cheap checks first: a wrong path fails before torch is imported.
    if args.trajectory and args.prompt:
        raise SapError("Give either --trajectory or --prompt, not both.")
    if args.trajectory and not Path(args.trajectory).is_file() and not Path(args.trajectory + ".npz").is_file():
        raise SapError(
            f"No trajectory at '{args.trajectory}'; write one with 'generate --record-attention --trajectory {args.trajectory}'."
        )
    _check_outputs(args)
    from sap_core.diffusion import Trajectory
    from sap_core.sink_report import analyze

    sink_spec = _sink_spec(args)
    if args.trajectory:
        path = Path(args.trajectory)
        traj = Trajectory.load(path)  # TrajectoryError (a SapError) for a foreign, damaged or non-finite file
        if traj.mass is None:
            raise SapError(
                f"'{path}' has no attention mass; regenerate it with 'generate --record-attention --trajectory {path}'."
            )
        source = str(path)
    else:
        from sap_core.attention import AttentionRecorder
        from sap_core.diffusion import generate

        spec = _decode_spec(args)
        handle = _load(args)
        with Bar("generate", not args.quiet) as bar:
            traj = generate(
                handle,
                args.prompt or DEFAULT_PROMPT,
                spec,
                recorder=AttentionRecorder(),
                progress=bar,
                allow_large_capture=args.allow_large_capture,
            )
        source = args.model
    report = analyze(traj, sink_spec)
    if args.out:
        from sap_core.files import atomic_write

        atomic_write(args.out, report.to_json)
        print(f"wrote {args.out} (load with sap_core.sink_report.SinkReport.from_json)", file=sys.stderr)
    if args.csv:
        report.to_csv(args.csv)
        print(
            f"wrote {args.csv}/ (positions, steps, layers, scores .csv; load with sap_core.sink_report.read_csv)", file=sys.stderr
        )
    _write_json(_report_summary(report, source), None)
    return 0


def _report_summary(report, source: str) -> dict:
    """A short JSON view of a SinkReport: the aggregate instability, label counts, the sink positions."""
    from dataclasses import asdict

    import numpy as np

    labels = report.labels
    counts = {name: int((labels == name).sum()) for name in ("stable", "transient", "unstable", "none")}
    order = np.argsort(-report.positions.frequency, kind="stable")
    sinks = [int(j) for j in order if report.positions.frequency[j] > 0][:10]
    return {
        "source": source,
        "spec": report.spec.to_dict(),
        "n_steps": report.n_steps,
        "length": report.length,
        "prompt_length": report.prompt_length,
        "aggregate": asdict(report.aggregate),
        "label_counts": counts,
        "top_sink_positions": [
            {
                "position": j,
                "frequency": float(report.positions.frequency[j]),
                "variance": float(report.positions.variance[j]),
                "label": str(labels[j]),
            }
            for j in sinks
        ],
        "dominant": report.dominant,
    }


def cmd_prune(args) -> int:
    from sap_core.pruning import PruneSpec, check_sparsity, prune

    spec = PruneSpec(
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        sink=_sink_spec(args),
        calibration=_calibration_spec(args),
        heads=args.heads,
        bias_compensation=args.bias_compensation,
        **({} if args.sparsegpt_selection is None else {"sparsegpt_selection": args.sparsegpt_selection}),
    )
    spec.validate()
    _check_outputs(args)
    handle = _load(args)
    if args.preset == "official":  # the official code's calibration over the model's whole context
        given = [k for k, v in vars(args).items() if k.startswith(("calib_", "sink_")) and v is not None]
        if given:
            raise UsageError(
                f"--preset official fixes the calibration and sink settings; drop "
                f"{', '.join('--' + k.replace('_', '-') for k in given)}."
            )
        spec = PruneSpec.official(args.method, args.sparsity, args.pattern, seqlen=handle.max_length)
        spec = dataclasses.replace(spec, heads=args.heads, bias_compensation=args.bias_compensation)
        if args.sparsegpt_selection is not None:
            spec = dataclasses.replace(spec, sparsegpt_selection=args.sparsegpt_selection)
    if args.save:  # now with the loaded model's real directory
        from sap_core.pruning.variant import check_save_target

        check_save_target(args.save, handle, overwrite=args.overwrite)
    with Bar("prune", not args.quiet) as bar:
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
    _write_json(data, args.out)
    return 0


def cmd_accuracy(args) -> int:
    from sap_core.accuracy import accuracy_table, format_table, save_accuracy
    from sap_core.benchmark import BenchSpec, load_variant
    from sap_core.tasks import load_tasks, manager_for

    spec = BenchSpec(mc_num=args.mc_num, batch_size=args.mc_batch or args.mc_num, cfg=args.cfg, seed=args.eval_seed)
    _check_outputs(args)
    load_tasks(args.tasks, manager_for(args.tasks, args.include_path))  # before the model loads
    handle = _load(args)
    variants = {}
    for d in args.variant:
        v = load_variant(handle, d)
        variants[v.label if v.label not in variants else f"{v.label} ({d})"] = v
    with Bar("accuracy", not args.quiet) as bar:
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


def cmd_evaluate(args) -> int:
    from sap_core.sweep import perplexity

    if args.tasks:
        return cmd_accuracy(args)

    spec = _eval_spec(args)
    spec.validate()
    _check_outputs(args)
    handle = _load(args)
    from sap_core.evaluate import check_length

    check_length(handle, spec.seqlen, "--seqlen")
    with Bar("perplexity", not args.quiet) as bar:
        row = perplexity(handle, spec, progress=bar)
    _write_json(
        {
            "model": args.model,
            "kind": "causal" if handle.causal else "masked-diffusion",
            "ppl": row.ppl,
            "ppl_se": row.ppl_se,
            "nll": row.nll,
            "nll_se": row.nll_se,
            "seconds": row.seconds,
            "seqlen": spec.seqlen,
            "nsamples": spec.nsamples,
            "draws": None if handle.causal else spec.draws,
            "seed": None if handle.causal else spec.seed,
            "prefix": spec.prefix,
            "text": args.text or "built-in",
        },
        args.out,
    )
    return 0


def cmd_sweep(args) -> int:
    from sap_core.sweep import SweepSpec, SweepWriter, estimates_path, run_sweep

    spec = SweepSpec(
        methods=tuple(args.methods),
        sparsities=tuple(args.sparsities),
        patterns=tuple(args.patterns),
        sink=_sink_spec(args),
        calibration=_calibration_spec(args),
        eval=_eval_spec(args),
        sink_taus=tuple(args.sink_taus),
        heads=args.heads,
    )
    spec.validate()
    executor = None
    if args.executor == "ray":
        from sap_core.distributed import RayExecutor

        executor = RayExecutor(
            workers=args.workers, address=args.address, gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker
        )
    elif args.address is not None:
        raise UsageError("--address needs --executor ray")
    if args.plot:
        _check_plot_path(args.plot)
    _check_outputs(args)
    # Finished rows go to <out>.partial.csv as they arrive; --out is replaced only on success.
    writer = SweepWriter(args.out, resume=args.resume)
    if args.resume and writer.done is not None:
        print(f"resuming: {len(writer.rows)} finished row(s) from {writer.partial}", file=sys.stderr)
    handle = _load(args)
    try:
        with Bar("sweep", not args.quiet) as bar:
            df = run_sweep(handle, spec, progress=bar, on_result=writer.add, executor=executor, done=writer.done)
    except BaseException as exc:
        if writer.rows:
            again = (
                "run the same command with --resume to continue" if isinstance(exc, KeyboardInterrupt) else "--resume skips them"
            )
            print(
                f"note: the {len(writer.rows)} finished row(s) are in {writer.partial}; {args.out} was not changed; {again}",
                file=sys.stderr,
            )
        raise
    from sap_core.files import signals_held

    with signals_held():  # the CSV and its estimates are written (and the partial file removed) as one step
        writer.finish(df)
    side, plotted = estimates_path(args.out), not args.plot
    try:
        print(f"wrote {args.out}" + (f" and {side} (per-draw estimates)" if side.exists() else ""), file=sys.stderr)
        if args.plot:
            save_figure(df, args.plot, args.plot_view)
            plotted = True
            print(f"wrote {args.plot}", file=sys.stderr)
        if not args.quiet:
            cols = (
                ["label", "ppl", "ppl_se"]
                + [c for c in ("acc", "acc_se") if c in df.columns]
                + ["achieved_sparsity", "prune_seconds"]
            )
            print(df[cols].to_string(index=False), file=sys.stderr)
    except KeyboardInterrupt:  # the sweep's result is written: only the plot or the summary was cut short
        if not plotted:
            print(f"note: interrupted; {args.out} was written, the plot was not", file=sys.stderr)
            return 130
    failed = [(label, error) for label, error in zip(df["label"], df.get("error", [""] * len(df))) if str(error or "")]
    for label, error in failed:
        print(f"error: job '{label}' failed (its row in {args.out} holds the error): {error}", file=sys.stderr)
    return 1 if failed else 0


def _add_animate(sub) -> None:
    p = sub.add_parser(
        "animate",
        help="GIF or HTML of the sinks moving over the denoising steps",
        description="Draw the sinks of a trajectory (from 'generate --record-attention --trajectory NPZ') "
        "moving over the denoising steps: --out X.gif writes an animated GIF (per step, the mass each "
        "position receives, tokens and sinks marked), --out X.html the explorer's interactive view "
        "as one self-contained page. --model names the tokenizer for the token texts.",
    )
    p.add_argument(
        "--trajectory", required=True, metavar="NPZ", help="trajectory saved by 'generate --record-attention --trajectory'"
    )
    p.add_argument(
        "--out", required=True, metavar="GIF|HTML", help="file to write; the extension (.gif or .html) picks the format"
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="MODEL",
        help="model directory or built-in name whose tokenizer writes the token texts (default: token ids)",
    )
    p.add_argument(
        "--color-range",
        default="global99",
        choices=["global99", "global", "per-step"],
        help="colour/height range: fixed over all steps (99th percentile or maximum) or per step (default global99)",
    )
    p.add_argument("--layer", type=int, default=None, help="layer of the HTML's step x position map (default: all layers)")
    p.add_argument("--frame-ms", type=int, default=80, metavar="MS", help="time per frame in ms (default 80)")
    _add_sink(p)
    p.set_defaults(func=cmd_animate)


def cmd_animate(args) -> int:
    from sap_core.errors import SapError

    path = Path(args.trajectory)
    if not path.is_file():
        raise SapError(f"No trajectory at '{path}'; write one with 'generate --record-attention --trajectory {path}'.")
    if Path(args.out).suffix.lower() not in (".gif", ".html", ".htm"):
        raise SapError(f"--out '{args.out}' must end in .gif or .html (the extension picks the format).")
    from sap_core import animation
    from sap_core.diffusion import Trajectory
    from sap_core.sink_report import analyze

    spec = animation.AnimationSpec(color_range=args.color_range, layer=args.layer, frame_ms=args.frame_ms)
    try:
        traj = Trajectory.load(path)
    except Exception as exc:  # numpy/zipfile/json raise many kinds for a foreign file
        raise SapError(f"'{path}' is not a trajectory .npz written by 'generate --trajectory' ({type(exc).__name__}).") from None
    if traj.mass is None:
        raise SapError(f"'{path}' has no attention mass; regenerate it with 'generate --record-attention --trajectory {path}'.")
    report = analyze(traj, _sink_spec(args))
    tokens = animation.tokenizer_texts(args.model, traj.final_tokens) if args.model else None
    out = animation.write_animation(report, args.out, tokens, spec)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {report.n_steps} steps)", file=sys.stderr)
    return 0


def cmd_sinkstats(args) -> int:
    from sap_core.errors import SapError

    if len(args.models) != 2:
        raise SapError(f"--models takes two models, one masked-diffusion and one causal (got {len(args.models)}).")
    prompt_text = _read_text(args.prompt_file)  # a wrong path fails before torch is imported
    if args.prompt:
        raise SapError("sinkstats runs many prompts: give --prompt-file (one prompt a line) instead of --prompt.")
    import torch

    from sap_core.models import load_model
    from sap_core.sinkstats import evaluation_prompts, prompts_from_lines, run_sinkstats

    torch.set_num_threads(args.threads)
    decode, sink = _decode_spec(args), _sink_spec(args)
    handles = [load_model(m, device=args.device, dtype=args.dtype) for m in args.models]
    if prompt_text is not None:
        prompts = prompts_from_lines(prompt_text, args.prompts)
    else:
        prompts = evaluation_prompts(handles[0], args.prompts, args.prompt_tokens)
    with Bar("sinkstats", not args.quiet) as bar:
        stats = run_sinkstats(*handles, prompts, decode, sink, labels=args.models, progress=bar)
    print(f"{stats.n_prompts} prompts x 2 models in {stats.seconds:.1f} s", file=sys.stderr)
    if args.out:
        for path in stats.save(args.out):
            print(f"wrote {path}", file=sys.stderr)
        return 0
    doc = stats.to_dict()
    del doc["per_prompt"]
    _write_json(doc, None)
    return 0


def _check_plot_path(path: str) -> None:
    from sap_core.errors import SapError
    from sap_core.files import is_special

    if not is_special(path) and Path(path).suffix.lower() not in (".png", ".svg", ".pdf", ".jpg", ".jpeg", ".webp"):
        raise SapError(f"--plot '{path}': give a .png, .svg, .pdf, .jpg or .webp file name.")


def save_figure(df, path, view: str = "delta") -> None:
    """Draw the sweep with :func:`sap_core.viz.sweep_figure` (``view``: ``delta`` or ``absolute``) and write it with kaleido.

    kaleido 1.x drives a Chrome/Chromium; when none is on PATH and ``BROWSER_PATH`` is unset, Debian's
    ``/usr/bin/chromium`` is used.
    """
    from sap_core.errors import SapError
    from sap_core.viz import sweep_figure

    if "BROWSER_PATH" not in os.environ and not any(
        shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")
    ):
        if Path("/usr/bin/chromium").exists():
            os.environ["BROWSER_PATH"] = "/usr/bin/chromium"
    from sap_core.files import atomic_write

    fig = sweep_figure(df, view)
    try:
        atomic_write(
            path, lambda tmp: fig.write_image(str(tmp), width=1000, height=600, scale=2), suffix=Path(path).suffix or ".png"
        )
    except SapError:
        raise
    except Exception as exc:  # kaleido raises several kinds when no browser works
        raise SapError(
            f"Could not write the plot '{path}' ({type(exc).__name__}: {exc}). Install Chromium "
            "(apt-get install chromium) or set BROWSER_PATH to a Chrome binary; the CSV was written."
        ) from None


# --- entry point ------------------------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` runs (temporaries are removed)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    import signal
    import threading

    parser = build_parser()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        print("error: terminated" if isinstance(exc, Terminated) else "error: interrupted", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:
        from sap_core.errors import SapError

        if isinstance(exc, SapError):
            message = " ".join(str(exc).split()) or type(exc).__name__
            print(f"error: {message}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(exc, OSError) and exc.strerror:  # disk full, permission denied... while writing
            where = f" ({exc.filename})" if exc.filename else ""
            print(
                f"error: {exc.strerror}{where}; nothing was replaced (outputs are written to a temporary file first).",
                file=sys.stderr,
            )
            return 1
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
