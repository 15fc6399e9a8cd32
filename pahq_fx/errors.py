"""The exceptions pahq_fx raises on bad input, one class per kind of mistake.

All derive from :class:`PahqError`, so ``except pahq_fx.PahqError`` catches every documented failure.
Each also derives from the builtin that a caller would naturally expect (``IndexError`` for a head out
of range, ``ValueError`` for a bad format), so generic handlers keep working.
"""

from __future__ import annotations


class PahqError(Exception):
    """Base class of every error pahq_fx raises on purpose."""


class InvalidHeadError(PahqError, IndexError):
    """A (layer, head) pair that does not exist in the model, or is not a pair of ints."""


class InvalidInputsError(PahqError, ValueError):
    """Example or call inputs that are not integer ``input_ids`` in a form pahq_fx accepts."""


class UnsupportedArchitectureError(PahqError, ValueError):
    """The graph lacks a pattern the passes need (attention call, projection, residual stream...)."""


class UnsupportedFormatError(PahqError, ValueError):
    """A precision format or granularity that is unknown, or cannot run on the model's device."""


class QuantizationError(PahqError, RuntimeError):
    """Low-precision lowering was asked for but did not happen (for example no weight was quantized)."""


class TaskError(PahqError, ValueError):
    """A circuit-discovery task whose tensors are inconsistent or invalid."""


class CheckpointError(PahqError, ValueError):
    """A discovery checkpoint that is unreadable or belongs to a run with other arguments."""


class NonFiniteError(PahqError, ValueError):
    """A NaN or infinity where a number is needed: in a weight of the model (named), or in the task's clean metric."""


class PlanError(PahqError, ValueError):
    """A run that its plan says cannot fit the memory it may use (the message says what would), or a bad plan argument."""


class CircuitFormatError(PahqError, ValueError):
    """A circuit file that is not one pahq_fx reads, one written for another model, or a circuit that a file format
    (EAP-IG / MIB graphs) cannot express: the message names the node or setting."""
