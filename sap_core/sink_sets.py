"""Which positions are sinks in one layer's attention: the one function the sink lab asks (the sink-shift
comparison, :mod:`sap_core.sink_shift`, and sink ablation, :mod:`sap_core.ablation`).

:func:`layer_sink_flags` takes the per-head mass of a layer, ``[..., H, L]`` (``mass[..., h, j]``: the
attention mass key ``j`` receives in head ``h``, summed over queries), sums the heads the
:class:`~sap_core.sinks.SinkSpec` selects and applies its rule to each row on its own
(:func:`sap_core.sinks.sink_flags`; the official rule ``m(j) > mean + k·std`` by default), or the spec's
detector (:attr:`~sap_core.sinks.SinkSpec.sink_detector`, :mod:`sap_core.detectors`) to the selected heads
kept apart, as those that count heads need them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sap_core.sinks import SinkSpec, as_numpy, sink_flags


def layer_sink_flags(mass: Any, spec: SinkSpec = SinkSpec(), valid_length: Any = None, causal: bool = False) -> np.ndarray:
    """``bool [..., L]``: whether position ``j`` is a sink of the layer whose per-head mass is ``mass``
    ``[..., H, L]`` (numpy or torch). ``valid_length``: ``int [...]`` (positions beyond it do not exist
    and are never sinks) or None (all exist). ``spec.layers`` is not read: the caller picks the layer."""
    m = as_numpy(mass, np.float64)
    assert m.ndim >= 2, m.shape
    heads = list(spec.heads) if spec.heads is not None else slice(None)
    reduced = m[..., heads, :].sum(-2)
    lead, L = reduced.shape[:-1], reduced.shape[-1]
    valid = None if valid_length is None else np.broadcast_to(np.asarray(valid_length, np.int64), lead).reshape(-1)
    if spec.detector != "official":
        per_head = m[..., heads, :]
        exists = None if valid is None else np.arange(L)[None, :] < valid[:, None]  # bool [rows, L]
        rows = per_head.reshape(-1, 1, per_head.shape[-2], L)  # [rows, one group, H', L]
        return spec.sink_detector.flags(rows, exists)[:, 0].reshape(*lead, L)
    return sink_flags(reduced.reshape(-1, L), spec, valid, causal).reshape(*lead, L)


__all__ = ["layer_sink_flags"]
