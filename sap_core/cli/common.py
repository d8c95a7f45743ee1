"""What every ``sinkscope`` subcommand shares: the parser class and its usage error, argument types and
option groups, the spec builders, model loading, the progress bar, output checks and JSON writing."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from tqdm import tqdm

from sap_core.errors import SapError, SweepSpecError
from sap_core.files import atomic_write_text, check_output_dir, check_output_file
from sap_core.pruning.spec import check_sparsity
from sap_core.sinks import SinkSpec, parse_taus

EXIT_USAGE = 2

DEFAULT_PROMPT = "To be, or not to be, that is the question:"


class UsageError(Exception):
    """A bad command line (raised by the parser instead of printing usage and exiting)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse hook
        raise UsageError(f"{message} (see '{self.prog} --help')")


class Bar:
    """A ``progress(done, total, message)`` callback drawing tqdm bars on stderr.

    A new bar starts whenever ``total`` changes or ``done`` goes backwards (a new phase of a job).
    """

    def __init__(self, desc: str, enabled: bool = True):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if not self.enabled:
            return
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


def floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got '{text}'") from None
    try:
        return check_sparsity(value)
    except SapError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}") from None


def taus(text: str) -> tuple[float, ...]:
    try:
        return parse_taus(text)
    except SapError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _indices(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def read_text(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise SapError(f"No text file at '{path}'; give a UTF-8 text file.")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SapError(f"'{path}' is not UTF-8 text ({exc.reason}).") from None


def _jsonable(obj: Any) -> Any:
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
        return _jsonable(asdict(obj))
    return obj


def write_json(data: dict, out: str | None) -> None:
    text = json.dumps(_jsonable(data), indent=2)
    if out is None:
        print(text)
        return
    path = atomic_write_text(out, text + "\n")
    print(f"wrote {path}", file=sys.stderr)


def check_outputs(args) -> None:
    """Every output path of the command can be written: checked before any model is loaded or work done."""
    if getattr(args, "out", None):
        check_output_file(args.out, "--out")
    if getattr(args, "trajectory", None) and args.command == "generate":
        from sap_core.decoding import npz_path  # lazy: --help must not import torch

        check_output_file(npz_path(args.trajectory), "--trajectory")
    if getattr(args, "csv", None):
        check_output_dir(args.csv, "--csv")
    if getattr(args, "plot", None):
        check_output_file(args.plot, "--plot")
    if getattr(args, "save", None):
        from sap_core.pruning.variant import check_save_target  # lazy: --help must not import torch

        check_save_target(args.save, SimpleNamespace(source=args.model), overwrite=args.overwrite)


def _prompt(args) -> str | None:
    """The --prompt text; refuses bytes that are not UTF-8 (the shell passes them as surrogate escapes)."""
    if args.prompt is None:
        return None
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SapError(f"--prompt is not UTF-8 text (character {exc.start}); give UTF-8 text.") from None
    return args.prompt


def load(args):
    # lazy: --help must not import torch
    from transformers.utils import logging as hf_logging

    from sap_core.models import load_model

    hf_logging.set_verbosity_error()  # e.g. the tokenizer's "longer than max length" note on whole texts

    return load_model(args.model, device=args.device, dtype=args.dtype)


def decode_spec(args):
    from sap_core.decoding import DecodeSpec  # lazy: --help must not import torch

    _prompt(args)
    return DecodeSpec(
        gen_length=args.gen_length,
        steps=args.steps,
        block_length=args.block_length,
        remasking=args.remasking,
        temperature=args.temperature,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        sampler=args.sampler,
        alg=args.alg,
        alg_temp=args.alg_temp,
        eps=args.eps,
        top_p=args.top_p,
        top_k=args.top_k,
        text_only=getattr(args, "text_only", False),  # generate's --text-only (MMaDA)
    )


def sink_spec(args):
    given = {name: getattr(args, f"sink_{name}") for name in SINK_OPTIONS if getattr(args, f"sink_{name}", None) is not None}
    if getattr(args, "detector", None) is not None:
        given["detector"] = args.detector
    return SinkSpec(**given)


def calibration_spec(args):
    from sap_core.pruning import CalibrationSpec  # lazy: --help must not import torch

    given = {
        name: getattr(args, f"calib_{name}")
        for name in ("nsamples", "seqlen", "seed", "batch_size")
        if getattr(args, f"calib_{name}") is not None
    }
    return CalibrationSpec(text=read_text(args.calib_text), **given)


def eval_spec(args):
    from sap_core.evaluate import EvalSpec  # lazy: --help must not import torch

    return EvalSpec(
        seqlen=args.seqlen,
        nsamples=args.nsamples,
        draws=args.draws,
        seed=args.eval_seed,
        text=read_text(args.text),
        prefix=args.prefix,
        estimator=args.estimator,
        nll_type=args.nll_type,
    )


def metrics(args) -> tuple:
    """The metrics scored beside perplexity, from ``--metric`` (``ppl``: none; ``acc:TASK``: the accuracy on the
    lm-eval task TASK, with ``--limit``, ``--mc-num`` and the masks seeded by ``--eval-seed``)."""
    metric = args.metric
    if metric == "ppl":
        return ()
    if not metric.startswith("acc:") or not metric[4:]:
        raise SweepSpecError(f"metric must be ppl or acc:TASK, e.g. acc:sinkscope_nextline (got {metric!r}).")
    from sap_core.lmeval.accuracy import TaskAccuracy  # lazy: lm-eval is heavy, and only --metric acc:TASK needs it

    return (TaskAccuracy(metric[4:], limit=args.limit, mc_num=args.mc_num, seed=args.eval_seed),)


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


def add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny-dlm", help="built-in name (tiny-dlm, tiny-ar) or model directory (default: tiny-dlm)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:0 ... (default: auto)")
    g.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weights dtype (default: auto)"
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def add_decode(p: argparse.ArgumentParser, prompt_required: bool = False) -> None:
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
    )  # sap_core.decoding.REMASKING, kept literal for a fast --help
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    g.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance scale (default 0 = off)")
    g.add_argument("--seed", type=int, default=0, help="decoding seed (default 0)")
    g.add_argument(
        "--sampler",
        default=None,
        choices=["llada", "dream"],
        help="llada: blocks and an even split per step; dream: Dream's own diffusion_generate "
        "(default: the model family's own, dream for Dream models, llada otherwise)",
    )  # sap_core.decoding.SAMPLERS
    g.add_argument(
        "--alg",
        default="entropy",
        choices=["origin", "maskgit_plus", "topk_margin", "entropy"],
        help="dream sampler: which positions a step unmasks (default entropy)",
    )  # sap_core.decoding.DREAM_ALGS
    g.add_argument(
        "--alg-temp",
        type=float,
        default=0.0,
        help="dream sampler: draw positions from softmax(confidence/X) (default 0 = top ones)",
    )
    g.add_argument(
        "--eps", type=float, default=1e-3, help="dream sampler: final time of linspace(1, eps, steps+1) (default 0.001)"
    )
    g.add_argument("--top-p", type=float, default=1.0, help="dream sampler: nucleus filtering, in (0, 1] (default 1 = off)")
    g.add_argument("--top-k", type=int, default=0, help="dream sampler: keep the k most probable tokens (default 0 = off)")
    g.add_argument(
        "--allow-large-capture",
        action="store_true",
        help="record attention even when the record's estimate exceeds the free memory (default: refuse)",
    )


def add_sink(p: argparse.ArgumentParser) -> None:
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
    g.add_argument(
        "--detector",
        default=None,
        metavar="NAME[:PARAM]",
        help="which definition of a sink: official (default; official:K sets k), gu[:EPS] (Gu et al., share of heads "
        "with mean attention > EPS, 0.3), rulli[:EPS] (Rulli et al., attention > EPS x uniform, 3), head[:EPS] "
        "(mean attention over heads > EPS, 0.3); docs/sinks.md",
    )


def add_calibration(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib-text", default=None, help="UTF-8 text file to calibrate on (default: built-in calibration text)")
    g.add_argument("--calib-nsamples", type=positive, default=None, help="calibration windows (default: CalibrationSpec's, 16)")
    g.add_argument(
        "--calib-seqlen", type=positive, default=None, help="tokens per calibration window (default: CalibrationSpec's, 128)"
    )
    g.add_argument("--calib-seed", type=int, default=None, help="calibration seed (default 0)")
    g.add_argument("--calib-batch-size", type=positive, default=None, help="sequences per forward pass (speed only; default 10)")


def add_ablation(p: argparse.ArgumentParser, flag: str) -> None:
    g = p.add_argument_group("sink ablation (the sinks removed as keys at every pass)")
    g.add_argument(
        flag,
        dest="ablate",
        action="store_true",
        help="score the model(s) with and without the sinks (under the --sink-* rule) removed as keys; paired errors",
    )
    g.add_argument(
        "--ablate-layers", type=_indices, default=None, metavar="LIST", help="layers whose sinks are removed (default: all)"
    )


def ablation(args, sink=None):
    from sap_core.ablation import SinkAblation  # lazy: --help must not import torch

    return SinkAblation(layers=args.ablate_layers, sink=sink if sink is not None else sink_spec(args))


def add_eval(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("perplexity")
    g.add_argument("--text", default=None, help="UTF-8 text file to score (default: built-in evaluation text)")
    g.add_argument("--seqlen", type=positive, default=128, help="tokens per window, prefix included (default 128)")
    g.add_argument("--nsamples", type=positive, default=16, help="windows, evenly spread over the text (default 16)")
    g.add_argument("--draws", type=positive, default=8, help="masking draws per window, >= 2, DLM only (default 8)")
    g.add_argument(
        "--prefix",
        default=None,
        help="conditioning text before every window, never scored (a causal model needs one when its tokenizer adds no BOS)",
    )
    g.add_argument("--eval-seed", type=int, default=0, help="seed of the masking draws (default 0)")
    g.add_argument(
        "--estimator",
        choices=("llada", "dream"),
        default=None,
        help="masked-diffusion likelihood estimator, DLM only (default: the family's own: dream for a Dream model, llada otherwise)",
    )
    g.add_argument(
        "--nll-type",
        choices=("mc", "ar_ftb", "ar_btf"),
        default="mc",
        help="Dream's estimator: mc (Monte Carlo), ar_ftb / ar_btf (one row per token, left to right / right to left) (default mc)",
    )
