"""The incremental patching runtime (:mod:`.patching`) and its parts."""

from .patching import PatchingRuntime

__all__ = ["PatchingRuntime"]
