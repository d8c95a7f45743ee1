"""Dream's own estimator (issue 29 item 2): the ``sinkscope`` lm-eval model with ``estimator=dream`` and the
masked-diffusion perplexity with Dream's forward process, against a transcription of Dream's evaluation code on
a tiny random Dream checkpoint; bad options; the CLI and lm-eval entry points."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_families import make_dream_dir  # tests/ is on the path

from sap_core.errors import SapError
from sap_core.estimator import EstimatorError
from sap_core.evaluate import EvalSpec, Perplexity, diffusion_perplexity, perplexity
from sap_core.lmeval.model import BenchSpec, BenchSpecError, encode_pair, make_lm, request_seed
from sap_core.models import load_model

# --- transcription -------------------------------------------------------------------------------
# Written from reading the ``dream`` lm-eval model of HKUNLP/Dream, eval/eval.py, commit
# a1b4472a46545661e989c01b5867caafe04fb9c4: ``_forward_process``, ``get_logits``, ``_eval_target_nll_mc``,
# ``_eval_target_nll_ar`` and ``_encode_pair``. Its structure, global RNG included; the model is called raw
# (Dream's unshifted logits) and shifted here as Dream's ``get_logits`` does. Left out: the bf16 autocast (CUDA
# only) and guidance (Dream's ``get_logits`` reads ``self.cfg``, which the class never sets).

TOL = 1e-5  # relative: float32 logits; the transcription divides per token and sums in float32, ours in float64


class DreamEval:
    def __init__(self, model, tokenizer, mc_num, batch_size, nll_type="mc", log_type="ftb", sampling_eps=1e-3):
        self.model, self.tokenizer = model, tokenizer
        self.mc_num, self.batch_size, self.nll_type, self.log_type = mc_num, batch_size, nll_type, log_type
        self.sampling_eps = sampling_eps
        self.mask_id = model.config.mask_token_id

    def encode_pair(self, context, continuation):
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tokenizer.encode(context + continuation) + [self.tokenizer.eos_token_id]
        ctx = self.tokenizer.encode(context)
        return ctx, whole[len(ctx) :]

    def forward_process(self, batch):
        b, l = batch.shape
        u0 = torch.rand(1, dtype=torch.float32)
        t = (u0 + torch.arange(b).float() / b) % 1
        p_mask = ((1 - self.sampling_eps) * t + self.sampling_eps)[:, None].repeat(1, l)
        mask_indices = torch.rand((b, l)) < p_mask
        mask_indices[:, 0] = False
        mask_indices[:, -1] = False
        return torch.where(mask_indices, self.mask_id, batch), p_mask

    def get_logits(self, batch):
        logits = self.model(batch).logits
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)

    def nll_mc(self, prefix, target):
        seq = torch.cat([prefix, target])[None, :].repeat(self.batch_size, 1)
        loss_acc = []
        for _ in range(max(self.mc_num // self.batch_size, 1)):
            perturbed = seq.clone()
            noised, p_mask = self.forward_process(seq)
            if self.log_type == "ftb":
                perturbed[:, -len(target) :] = noised[:, -len(target) :]
            elif self.log_type == "btf":
                perturbed[:, : len(prefix)] = noised[:, : len(prefix)]
            else:
                perturbed = noised
            mask_indices = perturbed == self.mask_id
            logits = self.get_logits(perturbed)
            loss = F.cross_entropy(logits[mask_indices], seq[mask_indices], reduction="none") / p_mask[mask_indices]
            loss_acc.append((loss.sum() / self.batch_size).item())
        return sum(loss_acc) / len(loss_acc)

    def nll_ar(self, prefix, target):
        prefix, target = prefix[None], target[None]
        side = target if self.log_type == "ftb" else prefix
        n = side.shape[1]
        perturbed_ = side.repeat(n, 1)
        full = torch.ones(n, n, dtype=torch.bool)
        mask_index = torch.triu(full) if self.nll_type == "ar_ftb" else torch.tril(full)
        perturbed_[mask_index] = self.mask_id
        if self.log_type == "ftb":
            perturbed = torch.cat([prefix.repeat(n, 1), perturbed_], dim=-1)
        else:
            perturbed = torch.cat([perturbed_, target.repeat(n, 1)], dim=-1)
        logits = torch.cat([self.get_logits(perturbed[i : i + self.batch_size]) for i in range(0, n, self.batch_size)])
        mask_index[torch.triu(full, diagonal=1) if self.nll_type == "ar_ftb" else torch.tril(full, diagonal=-1)] = False
        other = torch.zeros(n, perturbed.shape[1] - n, dtype=torch.bool)
        index = torch.cat([other, mask_index], -1) if self.log_type == "ftb" else torch.cat([mask_index, other], -1)
        return F.cross_entropy(logits[index], side[0], reduction="sum").item()

    def loglikelihood(self, prefix, target):
        prefix, target = torch.tensor(prefix), torch.tensor(target)
        if self.nll_type == "mc":
            ll = -self.nll_mc(prefix, target)
            return ll / (len(target) + len(prefix)) if self.log_type == "union" else ll
        return -self.nll_ar(prefix, target)


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    return load_model(make_dream_dir(tmp_path_factory.mktemp("dream_eval")), device="cpu", dtype="float32")


REQUESTS = [("The quick brown fox", " jumps over"), ("To be, or not ", "to be"), ("A", " b c d e f g h i j"), ("Hello", "!")]


def _check(dream, spec: BenchSpec):
    lm = make_lm(dream, spec=spec)
    ref = DreamEval(dream.module, dream.tokenizer, spec.mc_num, spec.batch_size, spec.nll_type, spec.log_type)
    official_pairs = [ref.encode_pair(c, t) for c, t in REQUESTS]
    ours = lm.score_pairs([encode_pair(dream, c, t) for c, t in REQUESTS], append_eos=True)
    for (prefix, target), (ll, _) in zip(official_pairs, ours):
        torch.manual_seed(request_seed(spec.seed, target))  # Dream's global RNG, seeded as our request's generator
        expected = ref.loglikelihood(prefix, target)
        assert ll == pytest.approx(expected, rel=TOL, abs=1e-6), (prefix, target)
        if spec.nll_type == "mc" and spec.log_type != "union":
            assert ll <= 0  # 0 when the noised side is one never-masked token (Dream: the same)
    return lm


@pytest.mark.parametrize("log_type", ["ftb", "btf", "union"])
def test_mc_equals_dream_eval_for_the_same_seed(dream, log_type):
    lm = _check(dream, BenchSpec(estimator="dream", mc_num=16, batch_size=8, seed=5, log_type=log_type))
    assert lm.estimator == "dream"


@pytest.mark.parametrize("nll_type,log_type", [("ar_ftb", "ftb"), ("ar_btf", "ftb"), ("ar_ftb", "btf"), ("ar_btf", "btf")])
def test_ar_equals_dream_eval(dream, nll_type, log_type):
    _check(dream, BenchSpec(estimator="dream", nll_type=nll_type, log_type=log_type, mc_num=4, batch_size=4))


def test_dream_is_the_default_for_dream_models_and_pairs_by_request(dream):
    lm = make_lm(dream, spec=BenchSpec(mc_num=8, batch_size=4, seed=1))
    assert lm.estimator == "dream"
    pairs = [encode_pair(dream, c, t) for c, t in REQUESTS]
    a = lm.score_pairs(pairs, append_eos=True)
    b = make_lm(dream, spec=BenchSpec(mc_num=8, batch_size=4, seed=1)).score_pairs(pairs[::-1], append_eos=True)[::-1]
    assert [x for x, _ in a] == pytest.approx([x for x, _ in b], rel=1e-9)
    # the LLaDA estimator stays available on a Dream model, and gives another (finite) number
    llada = make_lm(dream, spec=BenchSpec(estimator="llada", mc_num=8, batch_size=4, seed=1)).score_pairs(pairs)
    assert all(-1e4 < ll < 0 for ll, _ in llada) and [x for x, _ in llada] != [x for x, _ in a]


def test_loglikelihood_appends_eos_and_bos(dream):
    class Req:
        def __init__(self, *args):
            self.args = args

    spec = BenchSpec(mc_num=4, batch_size=4, add_bos_token=True)
    lm = make_lm(dream, spec=spec)
    (ll,) = [x for x, _ in lm.loglikelihood([Req(*REQUESTS[0])])]
    prefix, target = encode_pair(dream, dream.tokenizer.bos_token + REQUESTS[0][0], REQUESTS[0][1])
    assert prefix[0] == dream.tokenizer.bos_token_id
    assert ll == lm.score_pairs([(prefix, target)], append_eos=True)[0][0]


def test_perplexity_dream_equals_a_transcription_on_matched_draws(dream):
    """The perplexity's Dream draws (one stratified group of ``draws`` rows per window, text side only, as
    ``main_dream.py``'s forward process) scored by Dream's ``nll_mc`` loop on the same window and generator."""
    text = " ".join(["To be, or not to be, that is the question."] * 30)
    got = diffusion_perplexity(dream, text, seqlen=24, nsamples=3, draws=4, seed=2, prefix="Q:", estimator="dream")
    from sap_core.evaluate import windows

    seqs, P = windows(dream, text, 24, 3, "Q:")
    ref = DreamEval(dream.module, dream.tokenizer, 4, 4)
    torch.manual_seed(2)  # the perplexity's one generator, window after window
    n = seqs.shape[1] - P
    expected = [ref.nll_mc(seqs[w, :P], seqs[w, P:]) / n for w in range(3)]  # a window's mean over its draws, per token
    assert got.estimates.mean(1).tolist() == pytest.approx(expected, rel=TOL)
    assert got.draws == 4 and got.estimates.shape == (3, 4)
    # the full-logits reference way gives the same estimates; the default for a Dream model is Dream's
    ref_all = diffusion_perplexity(
        dream, text, seqlen=24, nsamples=3, draws=4, seed=2, prefix="Q:", estimator="dream", _all_positions=True
    )
    np.testing.assert_allclose(got.estimates, ref_all.estimates, rtol=TOL)
    spec = EvalSpec(seqlen=24, nsamples=3, draws=4, seed=2, prefix="Q:", text=text)
    assert perplexity(dream, spec).nll == pytest.approx(got.nll, rel=1e-12)


@pytest.mark.parametrize("nll_type", ["ar_ftb", "ar_btf"])
def test_perplexity_ar_is_dream_ar_per_window(dream, nll_type):
    text = " ".join(["To be, or not to be, that is the question."] * 30)
    got = diffusion_perplexity(dream, text, seqlen=20, nsamples=2, draws=2, prefix="Q:", estimator="dream", nll_type=nll_type)
    from sap_core.evaluate import windows

    seqs, P = windows(dream, text, 20, 2, "Q:")
    ref = DreamEval(dream.module, dream.tokenizer, 4, 4, nll_type=nll_type)
    n = seqs.shape[1] - P
    expected = sum(ref.nll_ar(seqs[w, :P], seqs[w, P:]) / n for w in range(2)) / 2
    assert got.nll == pytest.approx(expected, rel=TOL) and got.draws == 1 and got.estimates is None


def test_tiny_dlm_perplexity_default_stays_llada():
    dlm = load_model("tiny-dlm", device="cpu", dtype="float32")
    spec = EvalSpec(seqlen=32, nsamples=2, draws=2)
    assert perplexity(dlm, spec).nll == diffusion_perplexity(dlm, seqlen=32, nsamples=2, draws=2).nll
    assert make_lm(dlm, spec=BenchSpec(mc_num=4, batch_size=4)).estimator == "llada"


# --- bad options: one line, before any work -------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"estimator": "smdm"}, "estimator must be one of llada, dream"),
        ({"nll_type": "ar"}, "nll_type must be one of mc, ar_ftb, ar_btf"),
        ({"estimator": "llada", "nll_type": "ar_ftb"}, "the llada estimator has only mc"),
        ({"log_type": "both"}, "log_type must be one of ftb, btf, union"),
        ({"estimator": "llada", "log_type": "btf"}, "the llada estimator scores the continuation only"),
        ({"nll_type": "ar_btf", "log_type": "union"}, "needs log_type ftb or btf"),
        ({"sampling_eps": "1.5"}, r"sampling_eps must be a number in \(0, 1\)"),
        ({"sampling_eps": "x"}, "sampling_eps must be a number"),
        ({"add_bos_token": "maybe"}, "add_bos_token must be true or false"),
        ({"cfg": 1.0, "log_type": "union"}, "cfg needs log_type ftb or btf"),
    ],
)
def test_bad_options_are_one_line_errors(kw, match):
    with pytest.raises(SapError, match=match) as info:
        BenchSpec(**kw)
    assert "\n" not in str(info.value)


def test_bad_options_before_work(dream, monkeypatch):
    dlm = load_model("tiny-dlm", device="cpu", dtype="float32")
    with pytest.raises(BenchSpecError, match="the llada estimator scores the continuation only"):
        make_lm(dlm, spec=BenchSpec(log_type="btf"))  # the family's own estimator is LLaDA's here
    with pytest.raises(EstimatorError, match="the llada estimator has only mc"):
        make_lm(dlm, spec=BenchSpec(nll_type="ar_ftb"))
    with pytest.raises(EstimatorError, match="estimator must be one of"):
        Perplexity(EvalSpec(estimator="dreamy")).validate()
    with pytest.raises(EstimatorError, match="the llada estimator has only mc"):
        diffusion_perplexity(dlm, seqlen=16, nsamples=1, nll_type="ar_ftb")
    monkeypatch.setattr(type(dream), "logits", lambda *a, **k: pytest.fail("scored despite a bad option"))
    with pytest.raises(SapError, match="more than the model's context"):
        make_lm(dream, spec=BenchSpec(mc_num=4, batch_size=4)).score_pairs([([1, 2], [3]), ([1] * 300, [4])], append_eos=True)


# --- entry points --------------------------------------------------------------------------------


def test_cli_evaluate_with_dream_estimator(dream, tmp_path, capsys):
    from sap_core.cli import main

    out = tmp_path / "ppl.json"
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["To be, or not to be, that is the question."] * 30))
    args = ["evaluate", "--model", dream.source, "--device", "cpu", "--text", str(text), "--seqlen", "20", "--nsamples", "2"]
    assert main(args + ["--draws", "2", "--estimator", "dream", "--nll-type", "mc", "--quiet", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["estimator"] == "dream" and row["nll_type"] == "mc" and row["ppl"] > 1
    assert main(args + ["--estimator", "llada", "--nll-type", "ar_ftb", "--quiet"]) == 2
    assert "the llada estimator has only mc" in capsys.readouterr().err


def test_lm_eval_entry_point_with_dream_model_args(dream, capsys):
    from sap_core.lmeval.model import main as lm_eval_main
    from sap_core.lmeval.tasks import BUILTIN_TASK

    model_args = f"model={dream.source},device=cpu,estimator=dream,nll_type=mc,mc_num=4,batch_size=4"
    assert lm_eval_main(["--model", "sinkscope", "--model_args", model_args, "--tasks", BUILTIN_TASK, "--limit", "2"]) == 0
    assert BUILTIN_TASK in capsys.readouterr().out
    assert (
        lm_eval_main(["--model", "sinkscope", "--model_args", f"model={dream.source},nll_type=ar", "--tasks", BUILTIN_TASK]) == 2
    )
    err = capsys.readouterr().err
    assert "nll_type must be one of mc, ar_ftb, ar_btf" in err
