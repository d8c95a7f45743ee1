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


class Cancelled(SapError):
    """A long job was cancelled through its progress callback."""
