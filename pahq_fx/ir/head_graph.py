"""The documented description of a split model: layers, heads, key/value groups, whole components, canonical names.

This is what later work (ACDC, the CLI's ``inspect``) drives; it holds no tensors and no graph nodes.
Canonical names follow ``docs/acdc.md``: senders ``embed``, ``a{L}.h{H}``, ``a{L}.out``, ``m{L}[.{K}]``; receivers
``a{L}.h{H}.q``, ``a{L}.h{H}.k|v`` (``a{L}.g{G}.k|v`` under grouped-query attention), ``a{L}.out``, ``m{L}[.{K}]``,
``resid_post``.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import names
from .names import Role


@dataclass(frozen=True)
class Component:
    """A whole component that reads the residual stream and writes it, without heads: an MLP, or a hybrid's
    convolution or state-space mixer. ``reads`` are the contributions its input sums."""

    name: str
    reads: tuple[str, ...]


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer, its post-attention norm (if any) and the whole components that follow it before the
    next attention layer: its MLP (``m{L}``), and in hybrids the mixers and MLPs of the layers without attention
    (``m{L}.1``, ``m{L}.2``, ...).

    With a post-attention norm (Gemma 2, OLMo 2) the heads' outputs are summed and normalised before the
    residual add, so the heads send only to the norm node ``a{L}.out``, and it sends to the residual stream.
    ``coupled_roles`` are the attention inputs whose change reaches every head of the layer through a norm across
    heads: OLMo 2's query and key norms, or all three under BitNet's sub-norm before the output projection."""

    index: int
    n_heads: int
    n_kv_groups: int
    kv_group_of_head: tuple[int, ...]
    attention_reads: tuple[str, ...]
    components: tuple[Component, ...] = ()
    has_output_norm: bool = False
    coupled_roles: frozenset[Role] = frozenset()

    @property
    def has_mlp(self) -> bool:
        """Whether a whole component (an MLP) follows the attention layer."""
        return bool(self.components)

    @property
    def grouped(self) -> bool:
        """Whether key/value inputs belong to groups shared by several query heads."""
        return self.n_kv_groups != self.n_heads

    def heads_fed_by(self, role: Role, unit: int) -> list[int]:
        """The heads whose output the ``role`` input of ``unit`` (a head, or a key/value group) changes."""
        if role in self.coupled_roles:
            return list(range(self.n_heads))
        if role is Role.QUERY:
            return [unit]
        return [h for h in range(self.n_heads) if self.kv_group_of_head[h] == unit]

    def head_name(self, head: int) -> str:
        return names.head(self.index, head)

    def query_name(self, head: int) -> str:
        return names.attention_input(names.head(self.index, head), Role.QUERY)

    def kv_unit_name(self, group: int) -> str:
        """The node a key/value input belongs to: the group, or the head when heads do not share keys and values."""
        return names.kv_group(self.index, group) if self.grouped else names.head(self.index, group)

    def kv_name(self, group: int, role: Role) -> str:
        return names.attention_input(self.kv_unit_name(group), role)

    @property
    def output_norm_name(self) -> str:
        return names.attention_output(self.index)


@dataclass(frozen=True)
class HeadGraph:
    """The per-head structure of a model, as found by the split pass."""

    layers: tuple[LayerInfo, ...]
    final_reads: tuple[str, ...]
    d_model: int
    leading: tuple[Component, ...] = ()  # whole components before the first attention layer (a hybrid's mixers)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def senders(self) -> list[str]:
        """Sender names in topological order (embedding first)."""
        out = [names.EMBED] + [c.name for c in self.leading]
        for layer in self.layers:
            out += [layer.head_name(h) for h in range(layer.n_heads)]
            if layer.has_output_norm:
                out.append(layer.output_norm_name)
            out += [c.name for c in layer.components]
        return out

    def receivers(self) -> list[str]:
        """Receiver names in topological order (``resid_post`` last)."""
        out = [c.name for c in self.leading]
        for layer in self.layers:
            out += [layer.query_name(h) for h in range(layer.n_heads)]
            out += [layer.kv_name(g, Role.KEY) for g in range(layer.n_kv_groups)]
            out += [layer.kv_name(g, Role.VALUE) for g in range(layer.n_kv_groups)]
            if layer.has_output_norm:
                out.append(layer.output_norm_name)
            out += [c.name for c in layer.components]
        return [*out, names.RESID_POST]

    def describe(self) -> str:
        lines = [f"{self.n_layers} attention layers, d_model={self.d_model}"]
        lines += [f"  before layer 0: {c.name} reads {'+'.join(c.reads)}" for c in self.leading]
        for layer in self.layers:
            gqa = f", {layer.n_kv_groups} key/value groups {layer.kv_group_of_head}" if layer.grouped else ""
            norm = f"; heads summed and normed in {layer.output_norm_name}" if layer.has_output_norm else ""
            if layer.coupled_roles:
                roles = "/".join(r.name.lower() for r in Role if r in layer.coupled_roles)
                norm = f"; {roles} inputs reach every head (a norm across heads)" + norm
            mlp = "".join(f"; {c.name} reads {'+'.join(c.reads)}" for c in layer.components)
            lines.append(
                f"  layer {layer.index}: {layer.n_heads} heads{gqa}; attention reads {'+'.join(layer.attention_reads)}{norm}{mlp}"
            )
        lines.append(f"  {names.RESID_POST} reads {'+'.join(self.final_reads)}")
        lines.append(f"  {len(self.senders())} senders, {len(self.receivers())} receivers")
        return "\n".join(lines)
