"""Exception types of the model zoo: one line saying what, where, and what to do."""

from __future__ import annotations

__all__ = ["ModelConfigError", "ModelLoadError"]


class ModelLoadError(ValueError):
    """A checkpoint could not be turned into a complete, well-shaped params pytree."""


class ModelConfigError(ModelLoadError):
    """config.json / GGUF metadata describes a model this zoo cannot run."""
