"""SparseGPT (Frantar & Alistarh, 2023): prune a linear layer and reconstruct its output (OBS).

For a layer ``y = W x`` with calibration inputs ``X`` (columns = tokens), the layer-wise problem is
``min ‖W X − Ŵ X‖²`` over ``Ŵ`` with the chosen sparsity. Its Hessian is ``H = 2 X Xᵀ``
(:class:`Hessian` keeps ``(2/n)·Σ x xᵀ`` over ``n`` calibration sequences). Going through the
input columns left to right, each pruned weight's error ``(w − q)/[H⁻¹]_cc`` is spread over the
not-yet-visited columns of its row along the upper Cholesky factor of ``H⁻¹`` (the OBS update),
with lazy batched updates every ``blocksize`` columns. Dampening adds ``percdamp · mean(diag H)``
to the diagonal. Mask selection uses the OBS saliency ``w² / [H⁻¹]_cc²``.

Differences from the reference implementation, on purpose:

* Unstructured masks are chosen per row inside each column block (``round(s·i₂) − round(s·i₁)``
  weights of each row in block ``[i₁, i₂)``), not by one threshold over the whole block, so every
  row ends at exactly ``round(s·cols)`` zeros, as the other methods do (``selection="per_row"``,
  the default). ``selection="official"`` is the reference rule instead: in each column block, one
  threshold over all rows, ``thresh = sort(saliency.flatten())[int(numel·s)]``, and every weight
  with ``saliency <= thresh`` pruned (so ``int(numel·s) + 1`` weights per block without ties; rows
  end at different sparsities).
* The Hessian can be built from per-token weighted inputs ``w_j x_j`` (sink-aware SparseGPT).
* One Hessian serves every linear that reads the same input (q/k/v, gate/up), and with per-row or N:M
  selection, which treat every row on its own, those linears are pruned as one stacked matrix
  (:func:`sparsegpt_prune_group`): the same weights in one pass over the columns instead of one per linear.
"""

from __future__ import annotations

import torch

from sap_core.pruning.masks import lowest_k, n_prune, select_mask


class Hessian:
    """``(2/n) Σ_seq Σ_tokens (w_j x_j)(w_j x_j)ᵀ`` in float32; ``n`` counts sequences (as SparseGPT)."""

    def __init__(self, columns: int, device: torch.device):
        self.sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.sequences = 0
        self._matrix: torch.Tensor | None = None

    def add(self, x: torch.Tensor, token_weights: torch.Tensor | None = None) -> None:
        """``x``: ``[B, L, cols]`` layer inputs; ``token_weights``: ``[B, L]`` factors or None."""
        xf = x.float()
        if token_weights is not None:
            xf = xf * token_weights.to(xf.device, torch.float32)[..., None]
        flat = xf.reshape(-1, xf.shape[-1])
        self.sum.addmm_(flat.T, flat)
        self.sequences += x.shape[0]
        self._matrix = None

    def matrix(self) -> torch.Tensor:
        """``(2/n)·Σ x xᵀ``, computed once per set of batches."""
        if self._matrix is None:
            self._matrix = self.sum * (2.0 / max(self.sequences, 1))
        return self._matrix


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp·I)⁻¹``; raises the dampening if H is numerically singular."""
    mean_diag = torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    for attempt in range(6):
        Hd = H.clone()
        Hd[idx, idx] += percdamp * (10.0**attempt) * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            inv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return U
    raise RuntimeError(
        "SparseGPT: the layer Hessian is not positive definite even with 100000× dampening; "
        "use more (or more varied) calibration text."
    )


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    selection: str = "per_row",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` ``[rows, cols]`` given ``hessian`` ``[cols, cols]``.

    ``selection`` (unstructured only): ``"per_row"`` or ``"official"`` (see the module docstring).

    Returns ``(new_weight, mask)``: the reconstructed weight in ``weight``'s dtype and device, zero
    exactly where ``mask`` is True, and the bool mask. ``weight`` itself is not modified.
    """
    dtype, device = weight.dtype, weight.device
    W = weight.to(hessian.device, torch.float32).clone()
    rows, cols = W.shape
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = _inverse_cholesky(H, percdamp)
    if nm is not None:  # N:M groups must not straddle two lazy-update blocks
        blocksize = nm[1] * max(1, blocksize // nm[1])
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        if nm is None and selection == "official":
            saliency = W1**2 / d1[None, :] ** 2
            mask1 = saliency <= torch.sort(saliency.flatten())[0][int(saliency.numel() * sparsity)]
        elif nm is None:
            mask1 = lowest_k(W1**2 / d1[None, :] ** 2, n_prune(i2, sparsity) - n_prune(i1, sparsity))
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                j = i + nm[1]
                mask1[:, i:j] = select_mask(W1[:, i:j] ** 2 / d1[None, i:j] ** 2, 0.0, nm)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(device, dtype), mask.to(device)


def sparsegpt_prune_group(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    selection: str = "per_row",
) -> list[torch.Tensor]:
    """New weights of linears that read the same input (same ``hessian``), as :func:`sparsegpt_prune` gives
    for each. Per-row and N:M selection and the OBS updates work row by row, so the rows of all the linears
    are pruned as one stacked matrix: one pass over the columns (the slow, sequential part) instead of one
    per linear. ``selection="official"`` draws one threshold over all rows of a column block, so there each
    linear is pruned on its own, as the reference code does."""
    if selection == "official" or len(weights) == 1:
        return [sparsegpt_prune(W, hessian, sparsity, nm, blocksize, percdamp, selection)[0] for W in weights]
    stacked = sparsegpt_prune(torch.cat(weights), hessian, sparsity, nm, blocksize, percdamp, selection)[0]
    return [part.clone() for part in stacked.split([W.shape[0] for W in weights])]  # own storage each (saving)
