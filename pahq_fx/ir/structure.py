"""How the split GraphModule's components connect (:class:`Structure`, its :class:`Step` s) and where each traced
output comes from (:class:`GraphOutput`): what the split pass records and runtimes such as ACDC read.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from . import names


class StepKind(enum.Enum):
    """What a step of the split model runs."""

    ATTENTION = "attention"
    OUTPUT_NORM = "attention output norm"  # reads its layer's heads' sum, writes the residual stream
    MLP = "mlp"


@dataclass(frozen=True)
class Step:
    """One component of the residual stream, in execution order."""

    kind: StepKind
    name: str  # contribution name: a{L}, a{L}.out or m{L}
    reads: tuple[str, ...]
    aux: tuple[int, ...]

    @property
    def module(self) -> str:
        """The attribute of the split GraphModule that runs this step: the name as an identifier (``a0.out`` ->
        ``a0_out``, ``m-1.2`` -> ``m_1_2``), since module names cannot hold dots and generated code needs identifiers."""
        return names.identifier(self.name)


class OutputHome(enum.Enum):
    """Where the split model computes one of the traced graph's outputs."""

    LOGITS = "logits"
    STREAM = "residual stream"  # a read: hidden states, the embedding
    PRELUDE = "prelude"  # independent of the residual stream (positions, masks)
    ATTENTION = "attention core"  # key/value caches, attention weights
    UNEMBED = "unembedding"  # the final normed hidden state


@dataclass(frozen=True)
class GraphOutput:
    """One output of the split model: where it is computed and which value there (see :class:`OutputHome`)."""

    home: OutputHome
    reads: tuple[str, ...] = ()  # STREAM: the contributions summed
    component: str = ""  # ATTENTION: the block (a{L})
    index: int = 0  # PRELUDE: aux index; ATTENTION / UNEMBED: index among that component's extra outputs


@dataclass(frozen=True)
class Structure:
    """How the split GraphModule's components connect; kept in ``meta["structure"]`` for runtimes such as ACDC."""

    steps: tuple[Step, ...]
    final_reads: tuple[str, ...]
    final_aux: tuple[int, ...]
