"""The weight statistics a pruning method scores with, one small class each, registered in :data:`STATISTICS`.

A statistic is the science of a method: what it computes from a linear layer's weight ``W`` (``[out, in]``)
and its inputs ``X`` (one row per token, column ``c`` feeding column ``c`` of ``W``). Everything else (which
data the inputs come from, block-sequential or not, the sink weighting of the tokens) is the method's row of
:data:`~sap_core.pruning.spec.METHOD_TABLE`, and the run is :mod:`sap_core.pruning.engine` /
:mod:`sap_core.pruning.structured`. Adding a statistic is a class here and a row there.

* :class:`Magnitude`: ``|W|``, no data.
* :class:`Wanda` (Sun et al. 2023): ``|W|·‖X_c‖₂``; for whole structures (Wanda-sp), the sum of that score
  over every weight of the structure.
* :class:`Hessian` (SparseGPT, Frantar & Alistarh 2023): no score; the layer is pruned and reconstructed
  from ``X Xᵀ`` (:mod:`sap_core.pruning.sparsegpt`).
* :class:`Fluctuation` (FLAP, An et al. 2024): a channel's input variance × its output column's squared norm.

This module imports no torch (the score functions only call tensor methods), so the method table that refers
to these objects stays light for the CLI's ``--help``.
"""

from __future__ import annotations

from typing import ClassVar

STRUCTURES = ("weights", "channels")  # single weights set to zero; whole MLP channels / heads cut out


class Statistic:
    """What a method scores with. Traits the engine reads: ``structures`` (what it can remove), ``needs_inputs``
    (False: no calibration data), ``reconstructs`` (the layer is re-solved from its Hessian, not masked by a
    score; block-sequential only), ``compensates`` (FLAP's bias compensation applies). ``words``: the
    statistic in words, for help texts."""

    name: ClassVar[str]
    words: ClassVar[str]
    structures: ClassVar[tuple[str, ...]] = ("weights",)
    needs_inputs: ClassVar[bool] = True
    reconstructs: ClassVar[bool] = False
    compensates: ClassVar[bool] = False

    def weight_scores(self, W, norms):
        """``float32 [out, in]`` importance of each weight of ``W`` (pruned lowest first); ``norms``:
        ``‖X_c‖₂`` per input column (``float32 [in]``), None for a statistic without inputs."""
        raise NotImplementedError(f"{self.name} does not score single weights")

    def structure_scores(self, W_in: list, W_out, x_in, x_out):
        """``float64 [units]``: the score of each column of ``W_out`` together with the same rows of every
        matrix in ``W_in`` (an MLP channel: gate and up rows, down column; a head's columns: q, k, v rows, out
        column). ``x_in`` / ``x_out``: the token moments (:class:`~sap_core.pruning.scores.Moments`) of the
        input ``W_in`` reads and of ``W_out``'s input."""
        raise NotImplementedError(f"{self.name} does not score whole structures")

    def __repr__(self) -> str:
        return self.name


STATISTICS: dict[str, Statistic] = {}


def register(cls: type[Statistic]) -> type[Statistic]:
    """Class decorator: one instance of ``cls`` in :data:`STATISTICS` under ``cls.name``."""
    assert cls.name not in STATISTICS, f"statistic {cls.name!r} registered twice"
    assert set(cls.structures) <= set(STRUCTURES), cls.structures
    STATISTICS[cls.name] = cls()
    return cls


@register
class Magnitude(Statistic):
    name = "magnitude"
    words = "|W|"
    needs_inputs = False

    def weight_scores(self, W, norms):
        return W.abs().float()


@register
class Wanda(Statistic):
    name = "wanda"
    words = "Wanda column norms"
    structures = ("weights", "channels")

    def weight_scores(self, W, norms):
        return W.abs().float() * norms.to(W.device)[None, :]

    def structure_scores(self, W_in: list, W_out, x_in, x_out):
        rows = sum(W.double().abs() @ x_in.norm() for W in W_in)
        return rows + x_out.norm() * W_out.double().abs().sum(0)


@register
class Hessian(Statistic):
    name = "hessian"
    words = "SparseGPT Hessian"
    reconstructs = True  # sap_core.pruning.sparsegpt: OBS reconstruction from (2/n)·Σ x xᵀ


@register
class Fluctuation(Statistic):
    name = "fluctuation"
    words = "FLAP input variance × output column norm²"
    structures = ("channels",)
    compensates = True

    def structure_scores(self, W_in: list, W_out, x_in, x_out):
        return x_out.variance() * W_out.double().pow(2).sum(0)


MAGNITUDE, WANDA, HESSIAN, FLUCTUATION = (STATISTICS[k] for k in ("magnitude", "wanda", "hessian", "fluctuation"))
