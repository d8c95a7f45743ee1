"""A transcription of the official lm-eval model class's estimator (``eval_llada.py`` of ML-GSAI/LLaDA, which
VILA-Lab/Sink-Aware-Pruning evaluates with): ``_forward_process``, ``get_logits`` and ``get_loglikelihood``,
written out independently of :mod:`sap_core.lmeval.model` as the reference that ``tests/test_benchmark.py`` and
``bench/lmeval_cost.py`` compare it with."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Official:
    """The official ``_forward_process``, ``get_logits`` and ``get_loglikelihood``, written out from the
    paper's evaluation code: global torch RNG, full logits, one loss per group of ``batch_size`` rows."""

    def __init__(self, model, mask_id, mc_num, batch_size, cfg=0.0):
        self.model, self.mask_id, self.mc_num, self.batch_size, self.cfg = model, mask_id, mc_num, batch_size, cfg

    def forward_process(self, batch, prompt_index):
        b, l = batch.shape
        target_len = (l - prompt_index.sum()).item()
        k = torch.randint(1, target_len + 1, ())
        x = torch.round(torch.linspace(float(k), k + (b - 1) * (target_len / b), steps=b)).long()
        x = ((x - 1) % target_len) + 1
        indices = torch.arange(target_len).repeat(b, 1)
        is_mask = indices < x.unsqueeze(1)
        for i in range(b):
            is_mask[i] = is_mask[i][torch.randperm(target_len)]
        is_mask = torch.cat((torch.zeros(b, prompt_index.sum(), dtype=torch.bool), is_mask), dim=1)
        return torch.where(is_mask, self.mask_id, batch), (x / target_len).unsqueeze(1).repeat(1, l)

    def get_logits(self, batch, prompt_index):
        if self.cfg > 0:
            prompt_index = prompt_index.unsqueeze(0).repeat(batch.shape[0], 1)
            un_batch = batch.clone()
            un_batch[prompt_index] = self.mask_id
            batch = torch.cat([batch, un_batch])
        logits = self.model(batch).logits
        if self.cfg > 0:
            logits, un_logits = torch.chunk(logits, 2, dim=0)
            logits = un_logits + (self.cfg + 1) * (logits - un_logits)
        return logits

    @torch.no_grad()
    def get_loglikelihood(self, prefix, target):
        seq = torch.cat([prefix, target])[None, :].repeat((self.batch_size, 1))
        prompt_index = torch.arange(seq.shape[1]) < len(prefix)
        loss_acc = []
        for _ in range(self.mc_num // self.batch_size):
            perturbed, p_mask = self.forward_process(seq, prompt_index)
            mask_indices = perturbed == self.mask_id
            logits = self.get_logits(perturbed, prompt_index)
            loss = F.cross_entropy(logits[mask_indices], seq[mask_indices], reduction="none") / p_mask[mask_indices]
            loss_acc.append((loss.sum() / self.batch_size).item())
        return -sum(loss_acc) / len(loss_acc)
