"""Pruning of the linear layers inside the transformer blocks: baselines (magnitude, Wanda,
SparseGPT), the official sink-aware variants, the project's variance-gated variants and a noised
Wanda control, one row each of :data:`METHOD_TABLE`. See ``docs/pruning.md`` for the definitions and
how they relate to the official code.

    from sap_core.pruning import prune, PruneSpec, CalibrationSpec
    variant = prune(handle, PruneSpec("sink_wanda", 0.5))
    with variant.applied(handle):      # pruned weights swapped in, restored bit for bit on exit
        ...
    pruned = variant.apply_to_copy(handle)
    variant.save("runs/tiny-sink-wanda-50", handle)

The method table and specs import without torch (the CLI's ``--help`` reads them); the run and the
variant load on first use.
"""

from importlib import import_module

from sap_core.pruning.spec import METHOD_TABLE, METHODS, CalibrationSpec, Method, PruneSpec, numbered, parse_pattern

_LAZY = {
    "prune": "engine",
    "PrunedVariant": "variant",
    "check_sparsity": "variant",
    "target_linears": "variant",
    "CalibrationRecord": "record",
    "SinkRecord": "record",
    "record_calibration": "record",
}

__all__ = [
    "prune",
    "PruneSpec",
    "CalibrationSpec",
    "PrunedVariant",
    "CalibrationRecord",
    "SinkRecord",
    "record_calibration",
    "check_sparsity",
    "METHODS",
    "METHOD_TABLE",
    "Method",
    "parse_pattern",
    "numbered",
    "target_linears",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"sap_core.pruning.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sap_core.pruning' has no attribute {name!r}")
