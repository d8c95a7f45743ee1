"""Errors a user can cause. Each message says what to do instead."""


class SapError(Exception):
    """Base class for every user-facing SinkScope error."""


class ModelLoadError(SapError):
    """The model source cannot be loaded (missing path, wrong family, unsafe weights...)."""


class DecodeSpecError(SapError):
    """Impossible decoding settings."""


class SinkSpecError(SapError):
    """Impossible sink-analysis settings."""


class PruneSpecError(SapError):
    """Impossible pruning settings."""


class OffloadedModelError(SapError):
    """Weights to be pruned, swapped or saved are offloaded to CPU memory or disk (parameters on ``meta``)."""


class Cancelled(SapError):
    """A long job was cancelled through its progress callback."""


class OutputPathError(SapError):
    """An output path that cannot be written (a directory where a file goes, a file where a directory goes,
    an unwritable place, the loaded model's own directory, a non-variant directory without overwrite...)."""


class MemoryGuardError(SapError):
    """A job whose memory estimate exceeds the free RAM / GPU memory; refused before it starts."""


class SweepSpecError(SapError):
    """Impossible sweep or evaluation settings."""
