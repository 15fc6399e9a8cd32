"""The canonical node names of the per-head graph (docs/acdc.md), built and parsed in one place.

Senders: ``embed``, ``a{L}.h{H}`` (a head's output), ``a{L}.out`` (a post-attention norm's output), ``m{L}``
(an MLP's output, or any other whole component: the first one after attention layer ``L``; ``m{L}.{K}`` the
``K``-th after it where a hybrid runs several, ``m-1`` and ``m-1.{K}`` those before the first attention layer);
``a{L}.g{G}`` is the node of a key/value group. Receivers: ``a{L}.h{H}.q``,
``a{L}.h{H}.k`` / ``.v`` (``a{L}.g{G}.k`` / ``.v`` for a key/value group under grouped-query attention),
``a{L}.out`` (a post-attention norm's input: the sum of its layer's heads), ``m{L}[.{K}]`` (a whole component's
input) and ``resid_post``. The contributions that steps of the split model write are ``embed``, ``a{L}``, ``a{L}.out`` and
``m{L}``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from ..errors import CircuitFormatError

EMBED = "embed"
RESID_POST = "resid_post"


class Role(enum.Enum):
    """Which attention input: a projection feature, a receiver's suffix, a runtime's projection."""

    QUERY = "q"
    KEY = "k"
    VALUE = "v"


class NodeKind(enum.Enum):
    """What a node of the circuit is."""

    EMBED = "embed"
    HEAD = "head"
    KV_GROUP = "key/value group"
    ATTENTION_OUTPUT = "attention output norm"
    MLP = "mlp"
    RESID_POST = "resid_post"


def attention(layer: int) -> str:
    """The contribution of attention layer ``layer`` (all its heads): ``a{L}``."""
    return f"a{layer}"


def attention_output(layer: int) -> str:
    """The post-attention norm of layer ``layer`` (Gemma 2, OLMo 2): it reads the sum of the layer's heads and
    writes the residual stream, so its heads reach later layers only through it."""
    return f"a{layer}.out"


def mlp(layer: int, position: int = 0) -> str:
    """A whole component (an MLP, or a hybrid's convolution or state-space mixer): the ``position``-th after
    attention layer ``layer`` (``-1``: before the first attention layer). The first is ``m{L}``, as in every model
    that runs one MLP per layer; later ones ``m{L}.{K}``."""
    if layer < -1 or position < 0:
        raise ValueError(f"component after attention layer {layer}, position {position}: layer must be >= -1, position >= 0")
    return f"m{layer}" if position == 0 else f"m{layer}.{position}"


def head(layer: int, index: int) -> str:
    return f"a{layer}.h{index}"


def kv_group(layer: int, group: int) -> str:
    return f"a{layer}.g{group}"


def attention_input(unit: str, role: Role) -> str:
    """A head's or group's query/key/value receiver: ``a1.h2`` + KEY -> ``a1.h2.k``."""
    return f"{unit}.{role.value}"


@dataclass(frozen=True)
class Name:
    """A parsed canonical name. ``index`` is the head or key/value group, or a whole component's position after its
    attention layer; ``role`` is set for attention inputs."""

    kind: NodeKind
    layer: int | None = None
    index: int | None = None
    role: Role | None = None

    @property
    def layer_number(self) -> int:
        """``layer``, for the kinds that have one (all but embed and resid_post; a ``ValueError`` for those)."""
        if self.layer is None:
            raise ValueError(f"{self.kind.value} has no layer")
        return self.layer

    @property
    def unit(self) -> tuple[int, int]:
        """``(layer, index)`` of a head or key/value group (a ``ValueError`` for other kinds)."""
        if self.kind not in (NodeKind.HEAD, NodeKind.KV_GROUP) or self.layer is None or self.index is None:
            raise ValueError(f"{self.kind.value} is not a head or key/value group")
        return self.layer, self.index

    @property
    def node(self) -> str:
        """The node a receiver belongs to (``a1.h2.q`` -> ``a1.h2``); senders and other nodes unchanged."""
        if self.kind is NodeKind.HEAD:
            return head(*self.unit)
        if self.kind is NodeKind.KV_GROUP:
            return kv_group(*self.unit)
        if self.kind is NodeKind.MLP:
            return mlp(self.layer_number, self.index or 0)
        if self.kind is NodeKind.ATTENTION_OUTPUT:
            return attention_output(self.layer_number)
        return EMBED if self.kind is NodeKind.EMBED else RESID_POST


_PATTERN = re.compile(r"^(?:(embed|resid_post)|m(-1|\d+)(?:\.([1-9]\d*))?|a(\d+)\.out|a(\d+)\.([hg])(\d+)(?:\.([qkv]))?)$")


def parse(name: str) -> Name:
    """Parse a canonical name; anything else is a ``ValueError`` naming it."""
    match = _PATTERN.match(name)
    if match is None:
        raise ValueError(
            f"{name!r} is not a canonical node name (embed, a{{L}}.h{{H}}[.q|.k|.v], a{{L}}.g{{G}}.k|v, a{{L}}.out, "
            f"m{{L}}[.{{K}}], "
            "resid_post)"
        )
    special, mlp_layer, position, output_layer, layer, unit, index, role = match.groups()
    if special:
        return Name(NodeKind.EMBED if special == EMBED else NodeKind.RESID_POST)
    if mlp_layer is not None:
        return Name(NodeKind.MLP, int(mlp_layer), int(position) if position else None)
    if output_layer is not None:
        return Name(NodeKind.ATTENTION_OUTPUT, int(output_layer))
    kind = NodeKind.HEAD if unit == "h" else NodeKind.KV_GROUP
    if kind is NodeKind.KV_GROUP and role == "q":
        raise ValueError(f"{name!r}: a key/value group has no query input (only .k and .v)")
    return Name(kind, int(layer), int(index), Role(role) if role else None)


def identifier(name: str) -> str:
    """A node name as a Python identifier, for module attributes and generated code: ``a0.out`` -> ``a0_out``,
    ``m-1.2`` -> ``m_1_2``."""
    return re.sub(r"\W", "_", name)


def node_of(receiver: str) -> str:
    """``a1.h2.q`` -> ``a1.h2``; ``a1.g0.k`` -> ``a1.g0``; ``a1.out``, ``m1``, ``m1.2`` and ``resid_post`` unchanged."""
    return parse(receiver).node


# EAP-IG's graph (hannamw/EAP-IG, used by MIB): the only other names pahq_fx reads and writes. Nodes ``input``,
# ``a{L}.h{H}``, ``m{L}``, ``logits``; edges ``PARENT->CHILD`` and ``PARENT->a{L}.h{H}<q|k|v>``. Its key and value
# inputs are per query head: mapping a key/value group onto its heads needs the model's groups, which the graph
# files (pahq_fx/acdc/eap.py) know and a name does not.
EAP_INPUT = "input"
EAP_LOGITS = "logits"
_EAP_EDGE = re.compile(r"^(input|a\d+\.h\d+|m\d+)->(?:(a\d+\.h\d+)<([qkv])>|(m\d+|logits))$")


def eap_node(name: str) -> str:
    """The EAP-IG name of a canonical node: ``embed`` -> ``input``, ``resid_post`` -> ``logits``, ``a1.h2`` and ``m1``
    unchanged. A post-attention norm, a hybrid's extra component or a key/value group has none: a
    :class:`CircuitFormatError` names it."""
    parsed = parse(name)
    if parsed.role is not None:
        raise ValueError(f"{name!r} is an attention input, not a node: use eap_edge")
    if parsed.kind is NodeKind.EMBED:
        return EAP_INPUT
    if parsed.kind is NodeKind.RESID_POST:
        return EAP_LOGITS
    if parsed.kind is NodeKind.HEAD or (parsed.kind is NodeKind.MLP and parsed.layer_number >= 0 and not parsed.index):
        return name
    what = {
        NodeKind.ATTENTION_OUTPUT: "a post-attention norm (the heads' sum is normalised before the residual add)",
        NodeKind.KV_GROUP: "a key/value group (EAP-IG and MIB name key and value inputs per query head)",
        NodeKind.MLP: "a whole component beyond one MLP per attention layer (a hybrid's mixer or MLP)",
    }[parsed.kind]
    raise CircuitFormatError(
        f"{name} is {what}: EAP-IG/MIB graphs have only input, a{{L}}.h{{H}}, m{{L}} (one per layer) and logits"
    )


def eap_edge(sender: str, receiver: str) -> str:
    """The EAP-IG name of an edge into a canonical receiver: (``embed``, ``a1.h2.q``) -> ``input->a1.h2<q>``,
    (``a0.h1``, ``m1``) -> ``a0.h1->m1``. A key/value group's receiver has none (ungroup it per query head first)."""
    parsed = parse(receiver)
    child = f"{eap_node(parsed.node)}<{parsed.role.value}>" if parsed.role else eap_node(receiver)
    return f"{eap_node(sender)}->{child}"


def from_eap_edge(name: str) -> tuple[str, str]:
    """The canonical (sender, receiver) of an EAP-IG edge name, key and value inputs per query head
    (``input->a1.h2<k>`` -> (``embed``, ``a1.h2.k``)); anything else is a :class:`CircuitFormatError` naming it."""
    match = _EAP_EDGE.match(name)
    if match is None:
        raise CircuitFormatError(f"{name!r} is not an EAP-IG edge name (PARENT->CHILD or PARENT->a{{L}}.h{{H}}<q|k|v>)")
    parent, head_child, role, child = match.groups()
    sender = {EAP_INPUT: EMBED}.get(parent, parent)
    if head_child is not None:
        return sender, attention_input(head_child, Role(role))
    return sender, {EAP_LOGITS: RESID_POST}.get(child, child)
