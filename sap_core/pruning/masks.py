"""Mask selection from scores, and sparsity counting.

A mask is a bool tensor shaped like the weight, True where the weight is pruned (set to zero).
Selection is per output row (Wanda's comparison group): with ``pattern = unstructured`` every row
loses exactly :func:`n_prune` ``(cols, sparsity)`` weights, the lowest-scoring ones, so each row
hits the target within one weight; with ``N:M`` every group of M consecutive input weights in a
row keeps exactly its N highest-scoring weights. Ties are broken by column order (stable sort),
so the same scores always give the same mask.
"""

from __future__ import annotations

import torch


def n_prune(cols: int, sparsity: float) -> int:
    """Weights to prune in a row of ``cols``: ``round(sparsity · cols)`` (|error| <= 0.5 weight)."""
    return int(min(cols, max(0, round(float(sparsity) * cols))))


def select_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """``scores``: ``[rows, cols]`` (higher = more important). Returns the bool prune mask."""
    rows, cols = scores.shape
    if nm is None:
        return lowest_k(scores, n_prune(cols, sparsity))
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    n, m = nm
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices[:, :, : m - n]
    return mask.reshape(rows, cols // m, m).scatter_(2, order, True).reshape(rows, cols)


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` lowest scores of every row (stable: ties go to the lower column)."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        mask.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)
    return mask
