"""The ACDC graph over a split model: senders, receivers, edges, and the deterministic visiting order.

Order (documented in docs/acdc.md): receivers from the output backwards -- ``resid_post``,
then for each layer from last to first: its whole components (MLP; a hybrid's later mixers and MLPs) from the last
to the first, its post-attention norm, then its value inputs, key inputs and query inputs, each from the last head
(or key/value group) to the first; last, the components before the first attention layer, from the last to the
first. Within a receiver, senders from the nearest upstream to the embedding.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..ir import names
from ..ir.head_graph import Component, HeadGraph
from ..ir.names import Role


class ReceiverKind(enum.Enum):
    """What a receiver is; an attention input's query/key/value role is :attr:`Receiver.role`."""

    ATTENTION_INPUT = "attention input"
    OUTPUT_NORM = "attention output norm"
    MLP = "mlp"
    RESID_POST = "resid_post"


@dataclass(frozen=True)
class Sender:
    name: str
    index: int
    component: str  # the contribution it belongs to: embed, a{L} (heads), a{L}.out, m{L}[.{K}]
    head: int | None = None


@dataclass(frozen=True)
class Receiver:
    name: str
    kind: ReceiverKind
    layer: int | None
    unit: int | None  # query head, or key/value group (head under full multi-head attention)
    senders: tuple[int, ...]  # sender indices, in visiting order (nearest first)
    role: Role | None = None  # which attention input (attention inputs only)

    @property
    def is_attention_input(self) -> bool:
        return self.kind is ReceiverKind.ATTENTION_INPUT

    @property
    def attention_input(self) -> tuple[int, Role, int]:
        """``(layer, role, unit)`` of an attention input, all set for that kind (a ``ValueError`` for other kinds)."""
        if self.layer is None or self.role is None or self.unit is None:
            raise ValueError(f"{self.name} is not an attention input")
        return self.layer, self.role, self.unit


@dataclass(frozen=True)
class Edge:
    sender: str
    receiver: str


class EdgeGraph:
    """All senders, receivers and edges of a :class:`HeadGraph`."""

    def __init__(self, head_graph: HeadGraph) -> None:
        self.head_graph = head_graph
        self.senders: list[Sender] = []
        self._by_component: dict[str, list[int]] = {}
        self._add_sender(names.EMBED, names.EMBED)
        for component in head_graph.leading:
            self._add_sender(component.name, component.name)
        for layer in head_graph.layers:
            for h in range(layer.n_heads):
                self._add_sender(layer.head_name(h), names.attention(layer.index), h)
            if layer.has_output_norm:
                self._add_sender(layer.output_norm_name, layer.output_norm_name)
            for component in layer.components:
                self._add_sender(component.name, component.name)
        self.sender_index = {s.name: s.index for s in self.senders}
        self.receivers = self._receivers()
        self.receiver_index = {r.name: i for i, r in enumerate(self.receivers)}

    def _add_sender(self, name: str, component: str, head: int | None = None) -> None:
        sender = Sender(name, len(self.senders), component, head)
        self.senders.append(sender)
        self._by_component.setdefault(component, []).append(sender.index)

    def senders_of(self, components: tuple[str, ...]) -> tuple[int, ...]:
        """Sender indices of the given contributions, nearest first (reverse topological order)."""
        indices = sorted(i for c in components for i in self._by_component[c])
        return tuple(reversed(indices))

    def _receivers(self) -> list[Receiver]:
        hg = self.head_graph
        out = [Receiver(names.RESID_POST, ReceiverKind.RESID_POST, None, None, self.senders_of(hg.final_reads))]
        attention = ReceiverKind.ATTENTION_INPUT
        for layer in reversed(hg.layers):
            out += self._component_receivers(layer.components, layer.index)
            if layer.has_output_norm:
                heads = self.senders_of((names.attention(layer.index),))
                out.append(Receiver(layer.output_norm_name, ReceiverKind.OUTPUT_NORM, layer.index, None, heads))
            senders = self.senders_of(layer.attention_reads)
            for role in (Role.VALUE, Role.KEY):
                for g in reversed(range(layer.n_kv_groups)):
                    out.append(Receiver(layer.kv_name(g, role), attention, layer.index, g, senders, role))
            for h in reversed(range(layer.n_heads)):
                out.append(Receiver(layer.query_name(h), attention, layer.index, h, senders, Role.QUERY))
        return out + self._component_receivers(hg.leading, -1)

    def _component_receivers(self, components: tuple[Component, ...], layer: int) -> list[Receiver]:
        """Whole components' receivers, last first (``layer``: the attention layer they follow, -1 before the first)."""
        return [Receiver(c.name, ReceiverKind.MLP, layer, None, self.senders_of(c.reads)) for c in reversed(components)]

    def edges(self) -> list[Edge]:
        return [Edge(self.senders[s].name, r.name) for r in self.receivers for s in r.senders]

    def feeding_senders(self, receiver: Receiver) -> tuple[int, ...]:
        """The senders whose output is this receiver's node (a head, a group's heads, every head of the layer where
        the input is normalised across heads, a norm, a whole component); none for resid_post."""
        if receiver.kind is ReceiverKind.RESID_POST:
            return ()
        if not receiver.is_attention_input:
            return (self.sender_index[receiver.name],)
        index, role, unit = receiver.attention_input
        layer = self.head_graph.layers[index]
        return tuple(self.sender_index[layer.head_name(h)] for h in layer.heads_fed_by(role, unit))
