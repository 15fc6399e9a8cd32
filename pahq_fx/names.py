"""The canonical node names of the per-head graph (docs/acdc.md), built and parsed in one place.

Senders: ``embed``, ``a{L}.h{H}`` (a head's output), ``a{L}.out`` (a post-attention norm's output), ``m{L}``
(an MLP's output); ``a{L}.g{G}`` is the node of a key/value group. Receivers: ``a{L}.h{H}.q``,
``a{L}.h{H}.k`` / ``.v`` (``a{L}.g{G}.k`` / ``.v`` for a key/value group under grouped-query attention),
``a{L}.out`` (a post-attention norm's input: the sum of its layer's heads), ``m{L}`` (an MLP's input) and
``resid_post``. The contributions that steps of the split model write are ``embed``, ``a{L}``, ``a{L}.out`` and
``m{L}``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

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


def mlp(layer: int) -> str:
    return f"m{layer}"


def head(layer: int, index: int) -> str:
    return f"a{layer}.h{index}"


def kv_group(layer: int, group: int) -> str:
    return f"a{layer}.g{group}"


def attention_input(unit: str, role: Role) -> str:
    """A head's or group's query/key/value receiver: ``a1.h2`` + KEY -> ``a1.h2.k``."""
    return f"{unit}.{role.value}"


@dataclass(frozen=True)
class Name:
    """A parsed canonical name. ``index`` is the head or key/value group; ``role`` is set for attention inputs."""

    kind: NodeKind
    layer: int | None = None
    index: int | None = None
    role: Role | None = None

    @property
    def node(self) -> str:
        """The node a receiver belongs to (``a1.h2.q`` -> ``a1.h2``); senders and other nodes unchanged."""
        if self.kind is NodeKind.HEAD:
            return head(self.layer, self.index)
        if self.kind is NodeKind.KV_GROUP:
            return kv_group(self.layer, self.index)
        if self.kind is NodeKind.MLP:
            return mlp(self.layer)
        if self.kind is NodeKind.ATTENTION_OUTPUT:
            return attention_output(self.layer)
        return EMBED if self.kind is NodeKind.EMBED else RESID_POST


_PATTERN = re.compile(r"^(?:(embed|resid_post)|m(\d+)|a(\d+)\.out|a(\d+)\.([hg])(\d+)(?:\.([qkv]))?)$")


def parse(name: str) -> Name:
    """Parse a canonical name; anything else is a ``ValueError`` naming it."""
    match = _PATTERN.match(name)
    if match is None:
        raise ValueError(
            f"{name!r} is not a canonical node name (embed, a{{L}}.h{{H}}[.q|.k|.v], a{{L}}.g{{G}}.k|v, a{{L}}.out, m{{L}}, resid_post)"
        )
    special, mlp_layer, output_layer, layer, unit, index, role = match.groups()
    if special:
        return Name(NodeKind.EMBED if special == EMBED else NodeKind.RESID_POST)
    if mlp_layer is not None:
        return Name(NodeKind.MLP, int(mlp_layer))
    if output_layer is not None:
        return Name(NodeKind.ATTENTION_OUTPUT, int(output_layer))
    kind = NodeKind.HEAD if unit == "h" else NodeKind.KV_GROUP
    if kind is NodeKind.KV_GROUP and role == "q":
        raise ValueError(f"{name!r}: a key/value group has no query input (only .k and .v)")
    return Name(kind, int(layer), int(index), Role(role) if role else None)


def node_of(receiver: str) -> str:
    """``a1.h2.q`` -> ``a1.h2``; ``a1.g0.k`` -> ``a1.g0``; ``a1.out``, ``m1`` and ``resid_post`` unchanged."""
    return parse(receiver).node
