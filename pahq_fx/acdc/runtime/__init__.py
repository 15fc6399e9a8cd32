"""The incremental patching runtime (:mod:`.patching`) and its parts."""

from .inputs import ReceiverInputs
from .patching import PatchingRuntime

__all__ = ["PatchingRuntime", "ReceiverInputs"]
