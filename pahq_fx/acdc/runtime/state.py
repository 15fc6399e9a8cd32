"""What the runtime's parts share: the state :class:`~pahq_fx.acdc.runtime.PatchingRuntime` holds, declared once, and
the methods one part calls on another, as abstract stubs, so that every use in every part is type-checked."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from ...compile import CountingBackend
from ...ir.structure import Step, Structure
from ...metrics import CleanDistribution, Metric
from ...passes.precision import FullPrecisionUnits
from ..edges import EdgeGraph
from ..row_batch import RowBatch
from ..storage import Codec, Storage, Stored
from .deltas import Pending
from .edge_state import EdgeState
from .index import RuntimeIndex
from .rows import ReachedRows

if TYPE_CHECKING:
    from .inputs import ReceiverInputs

Aux = torch.Tensor | int  # a prelude's auxiliary value: a mask or positions, or a size (the batch's, the sequence's)
Kernel = Callable[..., torch.Tensor]


class RuntimeState(ABC):
    """Base of the runtime's parts. The attributes are set in ``PatchingRuntime.__init__`` (the graph, the index,
    the kernels), ``reset`` (the state of the patched pass) and ``CacheSetup._setup_caches`` (the caches)."""

    # The run: graph, edges, kernels, task.
    graph: fx.GraphModule
    _prelude: nn.Module  # the graph's prelude and unembedding, typed (fx leaves a submodule's type unknown)
    _unembed: nn.Module
    storage: Storage
    codec: Codec
    read_codec: Codec  # the clean reads' (storage.read_storage)
    edges: EdgeGraph
    metric_kind: Metric
    structure: Structure
    steps: tuple[Step, ...]
    counter: CountingBackend | None
    low_precision: bool
    index: RuntimeIndex
    _components: dict[int, Kernel]
    _cores: dict[int, Kernel]
    _metric: Kernel
    device: torch.device
    _clean_ids: torch.Tensor
    _compiled: bool
    positions: torch.Tensor
    correct: torch.Tensor | None
    incorrect: torch.Tensor | None
    _clean_metric: float

    # Candidate batches.
    _candidates: int | None
    _candidate_support: bool | None
    _candidate_removed: list[tuple[tuple[int, int], ...]]
    candidate_refusal: str
    _candidate_aux: dict[int, tuple[Aux, ...]]
    _candidate_rows: dict[int, tuple[RowBatch, tuple[Aux, ...], list[Aux]]]
    _packed_prelude: dict[tuple[int, int], tuple[Aux, ...]]  # the prelude's values per packed shape of reached rows

    # The caches, built at setup.
    aux: tuple[Aux, ...]
    _final_aux: list[Aux]
    _row_final_aux: list[Aux]
    _rows_prelude_aux: tuple[Aux, ...] | None
    clean: list[Stored]  # FP32 tensors during setup, until they are stored
    clean_reads: list[torch.Tensor]  # in read_codec's format: read them with clean_read(k)
    _last_read: tuple[int, torch.Tensor]  # the step whose read clean_read loaded last, and that FP32 tensor
    corrupt_minus_clean: list[Stored]
    _cmc_rows: list[Stored]
    clean_distribution: CleanDistribution
    row_batch: RowBatch
    final_rows: torch.Tensor
    _final_shape: torch.Size | None
    _final_clean: torch.Tensor
    token_wise_components: set[int]
    rows_restrictable: bool  # whether a query may recompute only the rows its change reaches
    restrict_rows: bool  # whether it does: restricting was measured faster on this model and task (setup)

    # The state of the patched pass.
    queries: int
    evaluated: int
    last_recomputed: list[str]
    edge_state: EdgeState
    active_from: int
    rows_only: set[int]
    plan: dict[int, FullPrecisionUnits]
    outputs: list[Stored]
    inputs: list[torch.Tensor | None]  # stored receiver inputs; all None where they are recomputed
    receiver_inputs: ReceiverInputs
    projections: dict[int, torch.Tensor]
    final: torch.Tensor
    metric: float
    _pending: Pending | None

    # InputState's.
    @abstractmethod
    def _input(self, row: int) -> torch.Tensor: ...

    @abstractmethod
    def _input_key(self, row: int) -> object: ...

    @property
    @abstractmethod
    def _keeps_inputs(self) -> bool: ...

    @abstractmethod
    def _keep_inputs(self, pending: Pending, k: int, new_inputs: dict[int, torch.Tensor], read: torch.Tensor | None) -> None: ...

    @abstractmethod
    def _inputs_to_rows(self, row: int) -> None: ...

    @abstractmethod
    def _input_tensors(self, from_step: int = 0) -> list[torch.Tensor]: ...

    @abstractmethod
    def reads_rows(self, row: int) -> bool: ...

    @abstractmethod
    def sends_rows(self, sender: int) -> bool: ...

    # PatchingRuntime's.
    @abstractmethod
    def _aux(self, indices: Iterable[int]) -> list[Aux]: ...

    @abstractmethod
    def commit(self) -> float: ...

    @abstractmethod
    def is_live(self, row: int) -> bool: ...

    # CacheSetup's.
    @abstractmethod
    def clean_read(self, k: int) -> torch.Tensor: ...

    @abstractmethod
    def final_rows_of(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _prelude_aux(self, rows: RowBatch) -> tuple[Aux, ...] | None: ...

    # Cascade's.
    @abstractmethod
    def _check_removable(self, row: int, senders: Iterable[int]) -> None: ...

    @abstractmethod
    def _remove(self, removals: dict[int, list[int]]) -> Pending: ...

    @abstractmethod
    def _removal_change(self, row: int, sender: int) -> torch.Tensor: ...

    @abstractmethod
    def _with_rows(self, sender: int, rows: ReachedRows, out: torch.Tensor) -> Stored: ...

    @abstractmethod
    def _cascade(
        self,
        changes: dict[int, torch.Tensor],
        activate_from: int | None,
        plan: dict[int, FullPrecisionUnits] | None,
        removed: tuple[tuple[int, int], ...] = (),
        new_inputs: dict[int, torch.Tensor] | None = None,
    ) -> Pending: ...

    # AttentionStep's.
    @abstractmethod
    def _attention(
        self,
        k: int,
        new_inputs: dict[int, torch.Tensor],
        changed: list[int],
        units: FullPrecisionUnits,
        old_units: FullPrecisionUnits | None,
        activating: bool,
        pending: Pending,
        rows: ReachedRows | None,
    ) -> dict[int, Stored]: ...

    # CandidateBatches'.
    @abstractmethod
    def _row_aux(self, k: int) -> list[Aux]: ...

    @abstractmethod
    def _row_component(self, k: int, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _packed_aux(self, k: int, rows: ReachedRows) -> list[Aux]: ...

    @abstractmethod
    def _flat(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _unflat(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _final_metric(self, final_rows: torch.Tensor) -> torch.Tensor: ...
