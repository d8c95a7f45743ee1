"""A transcription of the official Dream pruning, for tests/test_official_dream.py.

Source: VILA-Lab/Sink-Aware-Pruning at commit 6ef32c938ef3c885e00181e268aa9c7dad9f7c8c, ``lib/prune_dream.py``
(``_forward_diffusion``, ``_make_attention_mask``, ``_compute_sink_mask``, ``SinkCollector``,
``SinkActivationStats``, ``prune_sink``, ``prune_wanda``, ``prune_sink_sparsegpt``), ``lib/layerwrapper.py``
(``WrappedGPT.add_batch``) and ``main_dream.py`` (batch size 1, T = 50 sampled every 5, eps = 1e-3, k = 2,
alpha = 5). Written out by hand from that code, sharing nothing with ``sap_core``: the model is transformers'
own Qwen2 with the Dream checkpoint's weights and a full (bidirectional) additive mask
(``test_families.qwen2_reference``), the attention mass comes from its eager attention maps, the layer inputs
from forward hooks on its linears, SparseGPT from ``test_official.reference_sparsegpt``.

Two changes, both named: the random draws come from a ``torch.Generator`` passed in (the official code draws
from the global generator, seeded once in ``main_dream.py``), so the test can hand it the generator SinkScope
draws from; and the calibration windows are given (the official code draws its own from wikitext-2 with
Python's ``random``).
"""

from __future__ import annotations

import math

import torch
from test_official import reference_sparsegpt


def forward_diffusion(input_ids: torch.Tensor, mask_id: int, eps: float, generator: torch.Generator) -> torch.Tensor:
    """``_forward_diffusion``: t stratified over the batch, BOS/EOS (first and last positions) kept."""
    bsz, seq_len = input_ids.shape
    u0 = torch.rand(1, dtype=torch.float32, generator=generator)
    indices = torch.arange(bsz, dtype=torch.float32)
    t = (u0 + indices / bsz) % 1
    p_mask = (1.0 - eps) * t + eps
    p_mask = p_mask[:, None].repeat(1, seq_len)
    mask = torch.rand(input_ids.shape, dtype=torch.float32, generator=generator) < p_mask
    if seq_len >= 2:
        mask[:, 0] = False
        mask[:, -1] = False
    return torch.where(mask, torch.tensor(mask_id), input_ids)


def make_attention_mask(input_ids: torch.Tensor, pad_token_id: int | None):
    """``_make_attention_mask``: additive ``[B, 1, 1, L]``, float32 minimum on pad keys; None without pads."""
    if pad_token_id is None:
        return None
    pad_mask = input_ids != pad_token_id
    if torch.all(pad_mask):
        return None
    neg_inf = torch.finfo(torch.float32).min
    return ((1.0 - pad_mask.float()) * neg_inf)[:, None, None, :]


def full_mask(attention_mask, bsz: int, seq_len: int) -> torch.Tensor:
    """The additive mask as a ``[B, 1, L, L]`` tensor for transformers' Qwen2 (all zeros: bidirectional)."""
    if attention_mask is None:
        return torch.zeros(bsz, 1, seq_len, seq_len)
    return attention_mask.expand(bsz, 1, seq_len, seq_len)


def compute_sink_mask(mass: torch.Tensor, std_factor: float = 2.0, alpha: float = 5.0) -> torch.Tensor:
    mean = mass.mean(dim=1, keepdim=True)
    std = mass.std(dim=1, keepdim=True, unbiased=False)
    return torch.sigmoid(alpha * (mass - (mean + std_factor * std)))


def linears(model) -> dict[str, torch.nn.Linear]:
    """Every linear of every decoder layer, by its module name (``model.layers.0.self_attn.q_proj``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")}


def sink_mass(model, noisy: torch.Tensor, attention_mask) -> torch.Tensor:
    """``SinkCollector`` over every layer: ``attn_probs.sum(dim=2).sum(dim=1)`` summed over the layers."""
    out = model(noisy, attention_mask=full_mask(attention_mask, *noisy.shape), output_attentions=True)
    return sum(a.float().sum(dim=2).sum(dim=1) for a in out.attentions)


def batches(windows: torch.Tensor, batch_size: int):
    """``_batch_iter`` over the dataloader's one-window samples."""
    for b0 in range(0, windows.shape[0], batch_size):
        yield windows[b0 : b0 + batch_size]


@torch.no_grad()
def prune_sink(
    model, windows, sparsity, mask_id, pad_id, generator, steps=10, batch_size=1, eps=1e-3
) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """``prune_sink``: per batch and sampled step, noise, one pass for the sink mask, a second whose hooks add
    each linear's column L2 norms of ``x·(1 − mask)``; mask the ``int(cols·sparsity)`` lowest ``|W|·accum`` per
    row (``topk(largest=False)``). Returns ``({linear: pruned mask}, noised [N, steps, L], sink masks)`` and
    leaves the weights as they were."""
    layer_map = linears(model)
    accum = {name: torch.zeros(lin.in_features) for name, lin in layer_map.items()}
    context = {}

    def hook(name):
        def fn(_, inp, __):
            if "mask" not in context:
                return
            x = inp[0] * (1.0 - context["mask"]).unsqueeze(-1).to(inp[0].dtype)
            accum[name] += torch.norm(x.reshape(-1, x.shape[-1]).float(), p=2, dim=0)

        return fn

    hooks = [lin.register_forward_hook(hook(name)) for name, lin in layer_map.items()]
    noised, masks = [], []
    try:
        for batch in batches(windows, batch_size):
            attention_mask = make_attention_mask(batch, pad_id)
            rows = []
            for _ in range(steps):
                noisy = forward_diffusion(batch, mask_id, eps, generator)
                rows.append(noisy)
                sink = compute_sink_mask(sink_mass(model, noisy, attention_mask))
                masks.append(sink)
                context["mask"] = sink
                model(noisy, attention_mask=full_mask(attention_mask, *noisy.shape))
                context.clear()
            noised.append(torch.stack(rows, dim=1))
    finally:
        for h in hooks:
            h.remove()
    pruned = {}
    for name, lin in layer_map.items():
        metric = lin.weight.abs() * accum[name].reshape(1, -1)
        k = int(metric.shape[1] * sparsity)
        pruned[name] = torch.zeros_like(metric, dtype=torch.bool).scatter_(
            1, torch.topk(metric, k, dim=1, largest=False).indices, True
        )
    return pruned, torch.cat(noised), masks


def layer_forward(model, i: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``layer(inps[j].unsqueeze(0), attention_mask=..., position_ids=...)[0]`` on transformers' Qwen2 layer."""
    positions = torch.arange(hidden.shape[1])[None]
    rotary = model.model.rotary_emb(hidden, positions)
    out = model.model.layers[i](hidden, attention_mask=attention_mask, position_ids=positions, position_embeddings=rotary)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def sequential(model, windows, sparsity, make_acc, prune_layer, sink_weights=None, attention_mask=None):
    """The block-sequential loop of ``prune_wanda`` / ``prune_sink_sparsegpt``: the Catcher's layer-0 inputs
    (one window per sample), per layer the hooked statistics pass, pruning, and the pass through the pruned
    layer that feeds the next. Prunes the model in place; returns ``{linear: pruned mask}``."""
    N, L = windows.shape
    inps = model.model.embed_tokens(windows)[:, None]  # [N, 1, L, d]
    mask = full_mask(attention_mask, 1, L)
    pruned = {}
    for i in range(len(model.model.layers)):
        subset = {n: m for n, m in linears(model).items() if n.startswith(f"model.layers.{i}.")}
        accs = {name: make_acc(lin) for name, lin in subset.items()}
        current = {}

        def hook(name):
            def fn(_, inp, __):
                accs[name].add(inp[0], current.get("weight"))

            return fn

        handles = [lin.register_forward_hook(hook(name)) for name, lin in subset.items()]
        for j in range(N):
            if sink_weights is not None:
                current["weight"] = sink_weights[j : j + 1]
            layer_forward(model, i, inps[j], mask)
        for h in handles:
            h.remove()
        for name, lin in subset.items():
            pruned[name] = prune_layer(lin, accs[name], sparsity)
        inps = torch.stack([layer_forward(model, i, inps[j], mask) for j in range(N)])
    return pruned


class ScalerRow:
    """``WrappedGPT.add_batch``: the running mean of squared column norms."""

    def __init__(self, lin):
        self.scaler_row = torch.zeros(lin.in_features)
        self.nsamples = 0

    def add(self, inp, _weight):
        tmp = inp.shape[0]
        x = inp.reshape(-1, inp.shape[-1]).t().float()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        self.scaler_row += torch.norm(x, p=2, dim=1) ** 2 / self.nsamples


def wanda_layer(lin, acc: ScalerRow, sparsity: float) -> torch.Tensor:
    """``prune_wanda``'s unstructured mask: the first ``int(cols·sparsity)`` of a stable sort of the metric."""
    metric = lin.weight.abs() * torch.sqrt(acc.scaler_row.reshape(1, -1))
    idx = torch.sort(metric, dim=-1, stable=True)[1][:, : int(metric.shape[1] * sparsity)]
    mask = torch.zeros_like(metric, dtype=torch.bool).scatter_(1, idx, True)
    lin.weight.data[mask] = 0
    return mask


class SinkHessian:
    """``prune_sink_sparsegpt``'s ``add_batch_sink``: inputs scaled by the window's sink weight, then SparseGPT's H."""

    def __init__(self, lin):
        self.H = torch.zeros(lin.in_features, lin.in_features)
        self.nsamples = 0

    def add(self, inp, weight):
        x = inp if inp.dim() == 3 else inp.unsqueeze(0)
        if weight is not None:
            x = x * weight.unsqueeze(-1).to(x.dtype)
        x = x.reshape(-1, x.shape[-1]).t()
        tmp = inp.shape[0] if inp.dim() == 3 else 1
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        x = math.sqrt(2 / self.nsamples) * x.float()
        self.H += x.matmul(x.t())


def sparsegpt_layer(lin, acc: SinkHessian, sparsity: float) -> torch.Tensor:
    """SparseGPT's ``fasterprune`` (unstructured, blocksize 128, percdamp 0.01), the reference selection."""
    W = reference_sparsegpt(lin.weight.data, acc.H, sparsity)
    lin.weight.data = W.to(lin.weight.dtype)
    return W == 0


@torch.no_grad()
def sink_detection(model, windows, mask_id, pad_id, generator, steps=10, batch_size=1, eps=1e-3):
    """``prune_sink_sparsegpt``'s first stage: per window, the sink mask averaged over the sampled steps
    (``aggregated_mask / total_weight``), ``[N, L]``; and the noised inputs ``[N, steps, L]``."""
    out, noised = [], []
    for batch in batches(windows, batch_size):
        attention_mask = make_attention_mask(batch, pad_id)
        aggregated = torch.zeros(batch.shape, dtype=torch.float32)
        rows = []
        for _ in range(steps):
            noisy = forward_diffusion(batch, mask_id, eps, generator)
            rows.append(noisy)
            aggregated += compute_sink_mask(sink_mass(model, noisy, attention_mask))
        out.append(aggregated / steps)
        noised.append(torch.stack(rows, dim=1))
    return torch.cat(out), torch.cat(noised)


def prune_wanda(model, windows, sparsity):
    """``prune_wanda`` (unstructured): block-sequential on the clean windows, no attention mask."""
    return sequential(model, windows, sparsity, ScalerRow, wanda_layer)


def prune_sink_sparsegpt(model, windows, sparsity, mask_id, pad_id, generator, steps=10, batch_size=1, eps=1e-3):
    """``prune_sink_sparsegpt`` (unstructured): sink detection, then block-sequential SparseGPT on the clean
    windows with inputs scaled by ``1 − mean sink mask``, under the Catcher's attention mask (the last batch's).
    Returns ``({linear: pruned mask}, mean sink masks [N, L])``."""
    mean_masks, _ = sink_detection(model, windows, mask_id, pad_id, generator, steps, batch_size, eps)
    last = make_attention_mask(windows[-1:], pad_id)  # the Catcher keeps the last window's mask
    pruned = sequential(model, windows, sparsity, SinkHessian, sparsegpt_layer, 1.0 - mean_masks, last)
    return pruned, mean_masks
