"""Pruning of the linear layers inside the transformer blocks: baselines (magnitude, Wanda,
SparseGPT), the official sink-aware variants, the project's variance-gated variants and a noised
Wanda control. See ``docs/pruning.md`` for the definitions and how they relate to the official code.

    from sap_core.pruning import prune, PruneSpec, CalibrationSpec
    variant = prune(handle, PruneSpec("sink_wanda", 0.5))
    with variant.applied(handle):      # pruned weights swapped in, restored bit for bit on exit
        ...
    pruned = variant.apply_to_copy(handle)
    variant.save("runs/tiny-sink-wanda-50", handle)
"""
from sap_core.pruning.calibration import CalibrationRecord
from sap_core.pruning.engine import PrunedVariant, check_sparsity, prune, target_linears
from sap_core.pruning.spec import METHODS, CalibrationSpec, PruneSpec, parse_pattern

__all__ = [
    "prune", "PruneSpec", "CalibrationSpec", "PrunedVariant", "CalibrationRecord", "check_sparsity", "METHODS",
    "parse_pattern", "target_linears",
]
