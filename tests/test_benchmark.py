"""Benchmark accuracy through lm-eval: the sinkscope LM against a transcription of the official estimator,
the causal scorer against a direct computation, the built-in task, paired tables, the CLI and bad input."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from official_lmeval import Official  # tests/official_lmeval.py (pytest puts tests/ on the path)

from sap_core.errors import Cancelled, SapError
from sap_core.lmeval.model import BenchSpec, BenchSpecError, encode_pair, load_variant, make_lm, request_seed
from sap_core.lmeval.tasks import BUILTIN_TASK, TASKS_DIR, TaskError, load_tasks, manager_for
from sap_core.models import load_model

TOL = 1e-4  # absolute, on log-likelihoods of about -30 to -80 nats: float32 logits, summed in another order


@pytest.fixture(scope="module")
def dlm():
    return load_model("tiny-dlm", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def ar():
    return load_model("tiny-ar", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def docs():
    path = TASKS_DIR / BUILTIN_TASK / "nextline.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:3]]


def _pairs(handle, docs):
    return [encode_pair(handle, passage, "\n" + d["line"]) for d in docs for passage in d["passages"][:2]]


@pytest.mark.parametrize("cfg", [0.0, 0.5])
def test_loglikelihood_equals_official_transcription(dlm, docs, cfg):
    spec = BenchSpec(mc_num=16, batch_size=8, cfg=cfg, seed=3)
    pairs = _pairs(dlm, docs)
    ours = make_lm(dlm, spec=spec).score_pairs(pairs)
    official = Official(dlm.module, dlm.mask_id, 16, 8, cfg)
    for (prefix, target), (ll, greedy) in zip(pairs, ours):
        torch.manual_seed(request_seed(3, target))  # the official code's global RNG, same seed as our request's
        ref = official.get_loglikelihood(torch.tensor(prefix), torch.tensor(target))
        assert ll == pytest.approx(ref, abs=TOL) and greedy is False
        assert -200 < ll < 0


def test_masks_do_not_depend_on_order_or_batching(dlm, docs):
    pairs = _pairs(dlm, docs)
    a = make_lm(dlm, spec=BenchSpec(mc_num=8, batch_size=4)).score_pairs(pairs)
    b = make_lm(dlm, spec=BenchSpec(mc_num=8, batch_size=4)).score_pairs(pairs[::-1])[::-1]
    assert [x for x, _ in a] == pytest.approx([x for x, _ in b], abs=1e-9)


def test_encode_pair_moves_trailing_spaces(dlm):
    ctx, cont = encode_pair(dlm, "To be, or not  ", "to be")
    assert ctx == dlm.encode("To be, or not")
    assert dlm.encode("To be, or not  to be") == ctx + cont


def test_causal_loglikelihood_is_exact(ar, docs):
    pairs = _pairs(ar, docs)
    out = make_lm(ar).score_pairs(pairs)
    for (prefix, target), (ll, greedy) in zip(pairs, out):
        logp = ar.module(torch.tensor([prefix + target])).logits[0].double().log_softmax(-1)
        want = sum(logp[len(prefix) - 1 + i, t].item() for i, t in enumerate(target))
        assert ll == pytest.approx(want, abs=1e-6) and greedy is False
    # a continuation made of greedy tokens is greedy
    prefix = ar.encode("To be, or not to be")
    seq = list(prefix)
    for _ in range(3):
        seq.append(int(ar.module(torch.tensor([seq])).logits[0, -1].argmax()))
    assert make_lm(ar).score_pairs([(prefix, seq[len(prefix) :])])[0][1] is True


def test_dlm_greedy_check(dlm):
    from sap_core.decoding import DecodeSpec
    from sap_core.diffusion import generate

    prefix = dlm.encode("To be, or not to be")
    target = generate(dlm, prefix, DecodeSpec(gen_length=4, steps=4, block_length=4)).generated_ids.tolist()
    lm = make_lm(dlm, spec=BenchSpec(mc_num=4, batch_size=4, is_check_greedy=True))
    (_, yes), (_, no) = lm.score_pairs([(prefix, target), (prefix, target[:-1] + [(target[-1] + 1) % 4000 + 5])])
    assert yes is True and no is False


def test_rolling_and_generate_until(dlm, ar):
    from lm_eval.api.instance import Instance

    text = "To be, or not to be, that is the question."
    roll = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    for h in (dlm, ar):
        (ll,) = make_lm(h, spec=BenchSpec(mc_num=8, batch_size=8)).loglikelihood_rolling(roll)
        assert -400 < ll < 0
    ids = ar.encode(text)
    logp = ar.module(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    exact = sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids)))
    assert make_lm(ar).loglikelihood_rolling(roll)[0] == pytest.approx(exact, abs=1e-6)
    lm = make_lm(dlm, spec=BenchSpec(gen_length=16, steps=16, block_length=16))
    full = lm.generate_until([Instance("generate_until", {}, ("To be, or", {"until": []}), 0)])[0]
    stop = full[3:6]
    cut = lm.generate_until([Instance("generate_until", {}, ("To be, or", {"until": [stop]}), 0)])[0]
    assert full.startswith(cut) and stop not in cut and len(cut) < len(full)


def test_registered_and_simple_evaluate_on_builtin_task(dlm, ar):
    import lm_eval
    from lm_eval.api.registry import get_model

    lm = make_lm(dlm, spec=BenchSpec(mc_num=4, batch_size=4))
    assert get_model("sinkscope") is type(lm)
    manager = manager_for([BUILTIN_TASK])
    out = lm_eval.simple_evaluate(model=lm, tasks=[BUILTIN_TASK], task_manager=manager, limit=2)
    res = out["results"][BUILTIN_TASK]
    assert out["n-samples"][BUILTIN_TASK]["effective"] == 2 and 0 <= res["acc,none"] <= 1 and lm.passes > 0


def test_accuracy_table_paired(ar, tmp_path):
    from sap_core.lmeval.accuracy import accuracy_table, format_table, save_accuracy
    from sap_core.pruning import PruneSpec, prune

    variant = prune(ar, PruneSpec(method="magnitude", sparsity=0.5))
    before = {k: v.clone() for k, v in ar.module.state_dict().items()}
    res = accuracy_table(ar, [variant], [BUILTIN_TASK], limit=12)
    t = res.table
    assert list(t["model"]) == ["dense", "magnitude 50%"] and (t["n"] == 12).all()
    d = res.per_doc[(BUILTIN_TASK, "magnitude 50%")] - res.per_doc[(BUILTIN_TASK, "dense")]
    assert t.loc[1, "delta"] == pytest.approx(d.mean()) and t.loc[1, "se_delta"] == pytest.approx(d.std(ddof=1) / math.sqrt(12))
    assert all(torch.equal(v, ar.module.state_dict()[k]) for k, v in before.items())
    out, csv = save_accuracy(res, tmp_path / "acc.json")
    data = json.loads(out.read_text())
    assert data["lm_eval"]["dense"]["results"][BUILTIN_TASK]["acc,none"] == pytest.approx(t.loc[0, "acc"])
    assert csv.read_text().startswith("task,model,metric,n,acc")
    assert "±" in format_table(t).iloc[1, 4]


def test_cancel_restores_dense_weights(ar):
    from sap_core.lmeval.accuracy import accuracy_table
    from sap_core.pruning import PruneSpec, prune

    variant = prune(ar, PruneSpec(method="magnitude", sparsity=0.5))
    before = {k: v.clone() for k, v in ar.module.state_dict().items()}
    seen = []

    def progress(done, total, message):
        seen.append(message)
        if "magnitude" in message:
            raise Cancelled("cancelled")

    with pytest.raises(Cancelled):
        accuracy_table(ar, [variant], [BUILTIN_TASK], limit=2, progress=progress)
    assert any("dense" in m for m in seen)
    assert all(torch.equal(v, ar.module.state_dict()[k]) for k, v in before.items())


def test_bad_input_one_line_before_work(dlm, ar, tmp_path):
    with pytest.raises(BenchSpecError, match="multiple of batch_size"):
        BenchSpec(mc_num=10, batch_size=4)
    with pytest.raises(BenchSpecError, match="at least 1"):
        BenchSpec(mc_num=0, batch_size=4)
    lm = make_lm(dlm, spec=BenchSpec(mc_num=4, batch_size=4))
    with pytest.raises(SapError, match="more than the model's context"):
        lm.score_pairs([([1, 5, 6], [7, 8]), ([1] + [5] * 600, [7])])
    assert lm.passes == 0
    with pytest.raises(TaskError, match="Unknown lm-eval task 'no_such_task'"):
        load_tasks(["no_such_task"], manager_for([BUILTIN_TASK]))
    # a task whose data file is missing
    copy = tmp_path / "tasks" / "copy_nextline"
    shutil.copytree(TASKS_DIR / BUILTIN_TASK, copy)
    (copy / "nextline.jsonl").unlink()
    yaml = copy / "sinkscope_nextline.yaml"
    yaml.write_text(yaml.read_text().replace("task: sinkscope_nextline", "task: copy_nextline"))
    with pytest.raises(SapError, match="data of the task .* is missing"):
        load_tasks(["copy_nextline"], manager_for(["copy_nextline"], str(tmp_path / "tasks")))
    # a saved variant of another model
    from sap_core.pruning import PruneSpec, prune

    prune(ar, PruneSpec(method="magnitude", sparsity=0.5)).save(tmp_path / "v", ar)
    with pytest.raises(SapError, match="pruned from another model"):
        load_variant(dlm, tmp_path / "v")
    assert load_variant(ar, tmp_path / "v").label == "magnitude 50%"


def test_cli_evaluate_tasks_and_lm_eval_entry_point(ar, tmp_path, capsys):
    from sap_core.cli import main
    from sap_core.lmeval.model import main as lm_eval_main
    from sap_core.pruning import PruneSpec, prune

    prune(ar, PruneSpec(method="magnitude", sparsity=0.5)).save(tmp_path / "v", ar)
    out = tmp_path / "acc.json"
    args = ["evaluate", "--model", "tiny-ar", "--device", "cpu", "--tasks", BUILTIN_TASK, "--limit", "3", "--quiet"]
    assert main(args + ["--variant", str(tmp_path / "v"), "--out", str(out)]) == 0
    assert [r["model"] for r in json.loads(out.read_text())["table"]] == ["dense", "magnitude 50%"]
    assert (tmp_path / "acc.csv").exists()
    assert main(args + ["--mc-num", "6", "--mc-batch", "4"]) == 2
    assert main(["evaluate", "--model", "tiny-dlm", "--tasks", BUILTIN_TASK, "--variant", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert "multiple of batch_size" in err and "pruned from another model" in err
    argv = ["--model", "sinkscope", "--model_args", "model=tiny-ar,device=cpu", "--tasks", BUILTIN_TASK, "--limit", "2"]
    assert lm_eval_main(argv) == 0
    assert BUILTIN_TASK in capsys.readouterr().out


def test_cli_evaluate_refuses_the_other_modes_options(capsys, monkeypatch):
    import sap_core.cli.common as common
    from sap_core.cli import main

    monkeypatch.setattr(common, "load", lambda args: pytest.fail("the model loaded despite a useless option"))
    assert main(["evaluate", "--tasks", BUILTIN_TASK, "--nsamples", "4", "--draws", "2"]) == 2
    err = capsys.readouterr().err
    assert "--nsamples, --draws are perplexity options, which --tasks (accuracy) does not use: drop them" in err
    assert main(["evaluate", "--tasks", BUILTIN_TASK, "--seqlen", "64"]) == 2
    assert "--seqlen is a perplexity option" in capsys.readouterr().err
    assert main(["evaluate", "--mc-num", "4", "--limit", "3"]) == 2
    assert "--limit, --mc-num are for benchmark accuracy and only used with --tasks: add --tasks" in capsys.readouterr().err
    assert main(["evaluate", "--tasks", BUILTIN_TASK, "--eval-seed", "3", "--text", ""]) == 2  # '' is not the default None
    assert "--text is a perplexity option" in capsys.readouterr().err


def test_sweep_metric_acc(ar, tmp_path):
    from argparse import Namespace

    from sap_core.cli.common import metrics
    from sap_core.evaluate import EvalSpec
    from sap_core.lmeval.accuracy import TaskAccuracy
    from sap_core.sweep import SweepSpec, SweepSpecError, load_sweep, run_sweep, save_sweep

    ev = EvalSpec(nsamples=2)
    acc = TaskAccuracy(BUILTIN_TASK, limit=4)
    df = run_sweep(ar, SweepSpec(methods=("magnitude",), sparsities=(0.5,), eval=ev, metrics=(acc,)))
    assert list(df["label"]) == ["dense", "magnitude 50%"] and list(df["acc_task"]) == [BUILTIN_TASK] * 2
    assert list(df.columns[-3:]) == ["acc", "acc_se", "acc_task"]
    assert df["acc"].between(0, 1).all() and df["ppl"].notna().all()
    back = load_sweep(save_sweep(df, tmp_path / "s.csv"))
    assert back["acc"].tolist() == pytest.approx(df["acc"].tolist())
    assert "acc" not in run_sweep(ar, SweepSpec(methods=("magnitude",), sparsities=(0.5,), eval=EvalSpec(nsamples=2))).columns
    args = Namespace(metric=f"acc:{BUILTIN_TASK}", limit=4, mc_num=32, eval_seed=0)
    assert metrics(args) == (acc,)  # the CLI's --metric acc:TASK --limit --mc-num --eval-seed
    with pytest.raises(SweepSpecError, match="acc:TASK"):
        metrics(Namespace(metric="accuracy", limit=None, mc_num=32, eval_seed=0))
    with pytest.raises(TaskError, match="Unknown lm-eval task"):
        SweepSpec(methods=("magnitude",), sparsities=(0.5,), metrics=(TaskAccuracy("no_such_task"),)).validate()
