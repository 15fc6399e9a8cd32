"""The modules a per-head graph is made of: per-head projections, attention blocks split per head, and the
wrapper that gives a component its input's shape.

An :class:`AttentionBlock`'s inputs are per-head residual streams (``[batch, seq, heads, d_model]`` for queries,
``[batch, seq, kv_groups, d_model]`` for keys and values), its norm runs after the split, its projections are
per-head (:class:`PerHeadLinear`), and its output is the per-head contributions ``z_h @ W_O[h]``
(``[batch, seq, heads, d_model]``; their sum plus the output bias is the block output). The ops between projections
and the output projection (reshapes, rotary embeddings, the attention call) are the original graph's, reused
unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from .graph_utils import writes_in_place

NO_HEAD = -1


class PerHeadLinear(nn.Module):
    """``y[..., h, :] = x[..., h, :] @ weight[h].T + bias[h]``: every head its own input and weights.

    ``full_precision_head`` names the head that a low-precision subclass keeps in FP32 (``-1``: none). It is
    a buffer, so switching it changes a tensor input of the compiled graph, not the graph.
    """

    full_precision_head: torch.Tensor  # a buffer

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("full_precision_head", torch.tensor(NO_HEAD, dtype=torch.long, device=weight.device))

    @property
    def n_heads(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("...hi,hoi->...ho", x, self.weight)
        return y if self.bias is None else y + self.bias

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """Every head reading the same input, ``x`` [..., in] -> [..., heads, out]: one matrix multiply over the
        stacked weights instead of one per head on copies of ``x``."""
        bias = None if self.bias is None else self.bias.flatten()
        return torch.nn.functional.linear(x, self.weight.flatten(0, 1), bias).unflatten(-1, (self.n_heads, -1))

    def units(
        self, x: torch.Tensor, units: list[int], full_precision_unit: int = NO_HEAD, shared_input: bool = False
    ) -> torch.Tensor:
        """Projections of the listed heads only: ``x`` [..., len(units), in] -> [..., len(units), out]; with
        ``shared_input``, ``x`` is one input [..., in] that every listed head reads, projected by one matrix
        multiply over their stacked weights rather than once per head on copies of it.

        Every head runs in FP32 here; the low-precision subclass keeps ``full_precision_unit`` in FP32 and runs
        the others in its format. Lets a runtime recompute the few heads a change reaches.
        """
        if len(units) == 1:
            return self.fp32_unit(x if shared_input else x[..., 0, :], units[0]).unsqueeze(-2)
        if units == list(range(self.n_heads)):
            return self.shared(x) if shared_input else self(x)
        index = torch.tensor(units, device=self.weight.device)
        if shared_input:
            bias = None if self.bias is None else self.bias.index_select(0, index).flatten()
            return torch.nn.functional.linear(x, self.weight.index_select(0, index).flatten(0, 1), bias).unflatten(
                -1, (len(units), -1)
            )
        y = torch.einsum("...hi,hoi->...ho", x, self.weight.index_select(0, index))
        return y if self.bias is None else y + self.bias.index_select(0, index)

    def fp32_unit(self, x: torch.Tensor, unit: int) -> torch.Tensor:
        """``F.linear(x, W[unit], b[unit])``: one head in FP32, [..., in] -> [..., out]."""
        return torch.nn.functional.linear(x, self.weight[unit], None if self.bias is None else self.bias[unit])

    def extra_repr(self) -> str:
        h, o, i = self.weight.shape
        return f"heads={h}, in={i}, out={o}, format=fp32"


Span = tuple[int, int] | None


def contiguous_span(index: torch.Tensor) -> Span:
    """``(start, length)`` where ``index`` is the range ``start, start + 1, ...``; None otherwise."""
    if index.numel() == 0:
        return None
    start = int(index[0])
    return (start, index.numel()) if torch.equal(index.cpu(), torch.arange(start, start + index.numel())) else None


def select_features(x: torch.Tensor, index: torch.Tensor, span: Span) -> torch.Tensor:
    """``x.index_select(-1, index)``, as a view without a copy where the features are one contiguous range (the
    usual layout: a fused qkv projection's features in head order)."""
    return x.narrow(-1, *span) if span is not None else x.index_select(-1, index)


class AttentionBlock(nn.Module):
    """One attention layer split per head. ``forward`` returns per-head output contributions."""

    z_order: torch.Tensor  # a buffer

    def __init__(
        self,
        layer: int,
        norm: fx.GraphModule,
        n_norm_aux: int,
        q: PerHeadLinear,
        k: PerHeadLinear,
        v: PerHeadLinear,
        scatter: list[torch.Tensor],
        core: fx.GraphModule,
        z_order: torch.Tensor,
        o: PerHeadLinear,
        o_bias: torch.Tensor | None,
        kv_group_of_head: tuple[int, ...],
        n_extra_outputs: int = 0,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.n_extra_outputs = n_extra_outputs  # graph outputs computed inside the core (key/value caches)
        self.kv_group_of_head = kv_group_of_head
        self.n_heads = q.n_heads
        self.n_kv_groups = k.n_heads
        self.norm = norm
        self.n_norm_aux = n_norm_aux
        self.q, self.k, self.v, self.o = q, k, v, o
        for i, index in enumerate(scatter):
            self.register_buffer(f"scatter_{i}", index)
        self.n_projections = len(scatter)
        # Views of the projections only for a core that writes nothing in place: it could write into them.
        core_writes = any(writes_in_place(n) for n in core.graph.nodes)
        self.scatter_spans = tuple(None if core_writes else contiguous_span(index) for index in scatter)
        self.core = core
        self.register_buffer("z_order", z_order)
        self.z_span = contiguous_span(z_order)
        self.o_bias = None if o_bias is None else nn.Parameter(o_bias.detach().clone(), requires_grad=False)

    def project(
        self, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor, *norm_aux: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Per-head query, key and value projections of the per-head inputs (norm applied per head)."""
        sizes = [q_in.shape[2], k_in.shape[2], v_in.shape[2]]
        normed = self.norm(torch.cat([q_in, k_in, v_in], dim=2), *norm_aux)
        qn, kn, vn = torch.split(normed, sizes, dim=2)
        return self.q(qn), self.k(kn), self.v(vn)

    def forward(
        self,
        q_in: torch.Tensor,
        k_in: torch.Tensor,
        v_in: torch.Tensor,
        *aux: torch.Tensor,
        extra_outputs: bool = False,
        one_stream: bool = False,
    ) -> Any:
        """Per-head outputs; with ``extra_outputs``, also the graph outputs computed in the core, as
        ``(heads, (extra, ...))`` (they see the per-head projections, so the precision plan too).

        ``one_stream``: the three inputs are one residual stream [B, T, d] that every head reads (see
        :meth:`from_stream`), not per-head inputs [B, T, heads, d]."""
        norm_aux, core_aux = aux[: self.n_norm_aux], aux[self.n_norm_aux :]
        if one_stream:
            normed = self.norm(q_in.unsqueeze(2), *norm_aux).squeeze(2)
            q, k, v = self.q.shared(normed), self.k.shared(normed), self.v.shared(normed)
        else:
            q, k, v = self.project(q_in, k_in, v_in, *norm_aux)
        flat = torch.cat([q.flatten(-2), k.flatten(-2), v.flatten(-2)], dim=-1)
        outputs = self.scatter(flat)
        z = self.core(*outputs, *core_aux)
        extras: tuple[torch.Tensor, ...] = ()
        if self.n_extra_outputs:
            z, extras = z[0], tuple(z[1:])
        z_heads = select_features(z, self.z_order, self.z_span).unflatten(-1, (self.n_heads, -1))
        heads = self.o(z_heads)
        return (heads, extras) if extra_outputs else heads

    def scatter(self, projections: torch.Tensor) -> list[torch.Tensor]:
        """The concatenated per-head projections [..., features] laid out as the core's inputs (the projection
        outputs of the traced graph)."""
        return [select_features(projections, getattr(self, f"scatter_{i}"), span) for i, span in enumerate(self.scatter_spans)]

    def from_stream(self, read: torch.Tensor, *aux: torch.Tensor | int, extra_outputs: bool = False) -> Any:
        """Per-head outputs when every head's query, key and value read the same residual stream [B, T, d].

        The norm acts per position, so it runs once on the stream rather than once per head and role, and each
        projection is one matrix multiply (:meth:`PerHeadLinear.shared`): the values of ``forward`` on per-head
        copies of ``read``, to round-off."""
        return self(read, read, read, *aux, extra_outputs=extra_outputs, one_stream=True)

    def combine(self, head_outputs: torch.Tensor) -> torch.Tensor:
        """The block output: sum of per-head contributions plus the output bias."""
        total = head_outputs.sum(dim=2)
        return total if self.o_bias is None else total + self.o_bias


class StreamShaped(nn.Module):
    """Gives a component's output its input's [batch, seq, d] shape (OPT's MLP computes on [batch * seq, d])."""

    def __init__(self, component: fx.GraphModule) -> None:
        super().__init__()
        self.component = component

    def forward(self, x: torch.Tensor, *aux: torch.Tensor) -> torch.Tensor:
        return self.component(x, *aux).reshape(x.shape)
