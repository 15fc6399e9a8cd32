"""Find the attention sites, MLPs and residual stream of a traced causal LM, from the graph alone.

What is recognised (see README, "What the pass recognises"):

* an attention site is an ``aten.scaled_dot_product_attention`` call, or eager attention:
  ``matmul(q, k^T)`` -> ops with constants (scale, mask) -> softmax -> ``matmul(p, v)`` over [batch, heads, ...];
* its projections are the linear ops (``aten.linear``, ``aten.addmm``, ``aten.mm``, ``aten.matmul`` with a
  constant weight) reached by walking back from the query, key and value; they must all read one input;
* the *read* of a component (its residual-stream input) is the nearest dominator of its input that is a
  residual ``add`` or flows into one outside the component; the ops between read and projections are the
  norm, applied per head after the split;
* the output projection is the first linear op after the attention; its input features are assigned to
  heads, and the projection's query/key/value features to (role, head), by pushing NaN probes through the
  ops in between (reshapes, rotary embeddings, grouped-query repeats, ...), so no layout is written per model
  family; between output projection and residual add only reshapes and a constant factor are allowed;
* residual reads are decomposed into sums of contributions through ``add`` ops (and casts and reshapes of the
  token dimensions); a contribution that is not an attention output nor the embedding is an MLP, whose read is
  found the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .errors import UnsupportedArchitectureError
from .graph_utils import (
    SHAPE_OPS,
    ancestors,
    descendants,
    dominates,
    extract,
    first_with_shape,
    input_nodes,
    record_values,
)
from .names import Role

aten = torch.ops.aten

ATTENTION_TARGETS = {aten.scaled_dot_product_attention.default}
_SOFTMAX_TARGETS = {aten.softmax.int, aten._softmax.default}
_MATMUL_TARGETS = {aten.matmul.default}
_CAST_OPS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}
_ADD_TARGETS = {aten.add.Tensor, aten.add_.Tensor}  # Falcon adds attention into the MLP output in place


@dataclass(frozen=True)
class AttentionCall:
    """Where a graph computes attention: its query, key, value inputs and its output, each [batch, heads, ...]."""

    query: fx.Node
    key: fx.Node
    value: fx.Node
    output: fx.Node

    @property
    def inputs(self) -> list[fx.Node]:
        return [self.query, self.key, self.value]

    @property
    def name(self) -> str:
        return self.output.name



@dataclass(frozen=True)
class Linear:
    """A linear op of the graph, normalised to ``y = x @ weight.T + bias``."""

    node: fx.Node
    input: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass
class AttentionSite:
    """One attention block as found in the graph, with its derived head layout."""

    layer: int
    read: fx.Node
    normed: fx.Node
    projections: list[Linear]
    projection_outputs: list[fx.Node]
    attention: AttentionCall
    z: fx.Node
    output_linear: Linear
    contribution: fx.Node
    output_scale: float
    role_features: dict[Role, list[list[int]]]
    z_features: list[list[int]]
    kv_group_of_head: tuple[int, ...]

    @property
    def n_heads(self) -> int:
        return len(self.role_features[Role.QUERY])

    @property
    def n_kv_groups(self) -> int:
        return len(self.role_features[Role.KEY])


@dataclass
class MLPSite:
    """An MLP (any residual contribution that is not attention or embedding)."""

    layer: int
    read: fx.Node
    contribution: fx.Node


@dataclass
class ModelLayout:
    """Everything the split pass needs: sites, MLPs, the embedding and how every read sums contributions."""

    values: dict[fx.Node, Any]
    lead: tuple[int, int]
    embed: fx.Node
    sites: list[AttentionSite]
    mlps: list[MLPSite]
    final_read: fx.Node
    logits: fx.Node
    outputs: list[fx.Node]  # every graph output, in order; the logits are one of them
    leaves: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)


def as_linear(node: fx.Node, values: dict[fx.Node, Any], activations: set[fx.Node]) -> Linear | None:
    """Recognise ``node`` as a linear op with a constant weight, or return None."""
    if node.op != "call_function":
        return None

    def const(n: Any) -> torch.Tensor | None:
        return values.get(n) if isinstance(n, fx.Node) and n not in activations else None

    if node.target is aten.linear.default:
        weight, bias = const(node.args[1]), const(node.args[2]) if len(node.args) > 2 else None
        if weight is not None:
            return Linear(node, node.args[0], weight, bias)
    elif node.target is aten.addmm.default and not node.kwargs:
        weight, bias = const(node.args[2]), const(node.args[0])
        if weight is not None and bias is not None:
            return Linear(node, node.args[1], weight.t(), bias)
    elif node.target in (aten.mm.default, aten.matmul.default):
        weight = const(node.args[1])
        if weight is not None and weight.dim() == 2:
            return Linear(node, node.args[0], weight.t(), None)
    return None


class _Analysis:
    def __init__(self, gm: fx.GraphModule, example: torch.Tensor) -> None:
        self.gm = gm
        self.values = record_values(gm, example)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedArchitectureError(f"expected one input (input_ids), the graph has {len(placeholders)}")
        self.source = placeholders[0]
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.activations = self._activations()
        self.outputs = self._outputs()
        self.logits = self._logits()
        self.lead = tuple(self.values[self.logits].shape[:2])

    def _outputs(self) -> list[fx.Node]:
        out_node = next(n for n in self.gm.graph.nodes if n.op == "output")
        flat, _ = torch.utils._pytree.tree_flatten(out_node.args[0])
        for o in flat:
            if not isinstance(o, fx.Node) or not isinstance(self.values.get(o), torch.Tensor):
                raise UnsupportedArchitectureError(f"the graph returns {o!r}, which is not a tensor computed by the graph")
        return flat

    def _logits(self) -> fx.Node:
        """The logits among the outputs: the last-computed [batch, seq, vocab] tensor (a causal LM computes them
        last; key/value caches are 4-d, hidden states come before)."""
        batch, seq = self.values[self.source].shape
        candidates = [o for o in self.outputs if self.values[o].dim() == 3 and tuple(self.values[o].shape[:2]) == (batch, seq)]
        if not candidates:
            raise UnsupportedArchitectureError(f"none of the graph's {len(self.outputs)} outputs has the logits' shape [batch, seq, vocab]")
        return max(candidates, key=self.order.__getitem__)

    def _activations(self) -> set[fx.Node]:
        """Nodes whose value depends on the token ids' values (not only on their shape)."""
        out = {self.source}
        for n in self.gm.graph.nodes:
            if n is self.source or n.target is aten.sym_size.int:
                continue
            if any(p in out for p in input_nodes(n)):
                out.add(n)
        return out

    def linear(self, node: fx.Node) -> Linear | None:
        return as_linear(node, self.values, self.activations)

    def _is_residual_add(self, node: fx.Node) -> bool:
        return node.target in _ADD_TARGETS and all(
            isinstance(a, fx.Node) and a in self.activations for a in node.args[:2]
        )

    def find_read(self, target: fx.Node, what: str, itself: bool = False) -> fx.Node:
        """Nearest dominator of ``target`` on the residual stream: a residual add, or a node that also flows into
        one outside the component (a norm output shared by attention and MLP, as in GPT-J, is neither).
        With ``itself``, ``target`` may be its own read (projections reading the stream with no norm between)."""
        upstream = ancestors([target], within=self.activations)
        inside = upstream | {target}
        within = self.activations
        candidates = sorted(upstream, key=self.order.__getitem__, reverse=True)
        for candidate in ([target] if itself else []) + candidates:
            if candidate is self.source or not dominates(candidate, target, {self.source}, within):
                continue
            feeds_residual = any(u not in inside and self._is_residual_add(u) for u in candidate.users)
            if self._is_residual_add(candidate) or feeds_residual:
                return candidate
        raise UnsupportedArchitectureError(f"no residual-stream input found for {what} ({target.name})")

    def find_attention(self) -> list[AttentionCall]:
        """SDPA calls, and eager attention: ``matmul(q, k^T)`` -> ops with constants -> softmax -> ``matmul(p, v)``."""
        calls = []
        for node in self.gm.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in ATTENTION_TARGETS:
                calls.append(AttentionCall(node.args[0], node.args[1], node.args[2], node))
            elif node.target in _SOFTMAX_TARGETS and node in self.activations:
                call = self._eager_attention(node)
                if call is not None:
                    calls.append(call)
        return calls

    def _single_activation_input(self, node: fx.Node) -> fx.Node | None:
        inputs = [p for p in input_nodes(node) if p in self.activations]
        return inputs[0] if len(inputs) == 1 else None

    def _eager_attention(self, softmax: fx.Node) -> AttentionCall | None:
        scores = self._single_activation_input(softmax)
        while scores is not None and scores.target not in _MATMUL_TARGETS:
            scores = self._single_activation_input(scores)
        if scores is None or not all(isinstance(a, fx.Node) and a in self.activations for a in scores.args[:2]):
            return None
        probs = softmax
        while len(probs.users) == 1:
            user = next(iter(probs.users))
            if user.target in _MATMUL_TARGETS and user.args[0] is probs:
                value = user.args[1]
                if value in self.activations and self.values[user].dim() == 4:
                    return AttentionCall(scores.args[0], scores.args[1], value, user)
                return None
            if self._single_activation_input(user) is not probs:
                return None
            probs = user
        return None

    def _projections(self, attention: AttentionCall) -> list[Linear]:
        found: dict[fx.Node, Linear] = {}
        seen: set[fx.Node] = set()
        stack = list(attention.inputs)
        while stack:
            n = stack.pop()
            if n in seen or n not in self.activations:
                continue
            seen.add(n)
            lin = self.linear(n)
            if lin is not None:
                found[n] = lin
                continue
            if n is self.source:
                raise UnsupportedArchitectureError(
                    f"attention call {attention.name}: no linear query/key/value projection between it and the input"
                )
            stack.extend(input_nodes(n))
        return sorted(found.values(), key=lambda l: self.order[l.node])

    def _output_linear(self, attention: AttentionCall) -> Linear:
        frontier, seen = [attention.output], set()
        while frontier:
            n = min(frontier, key=self.order.__getitem__)
            frontier.remove(n)
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                lin = self.linear(u)
                if lin is not None:
                    return lin
                frontier.append(u)
        raise UnsupportedArchitectureError(f"attention call {attention.name}: no output projection (linear op) after it")

    def _probe(self, sub: fx.GraphModule, extra: list[fx.Node], inputs: list[torch.Tensor]) -> Any:
        with torch.no_grad():
            return sub(*inputs, *[self.values[e] for e in extra])

    def _role_features(self, attention: AttentionCall, outputs: list[fx.Node]) -> tuple[dict[Role, list[list[int]]], tuple[int, ...]]:
        """Assign every projection output feature to (role, head) with NaN probes."""
        args = attention.inputs
        body = (ancestors(args) | set(args)) & (descendants(outputs) | set(outputs))
        sub, extra = extract(self.gm, body, outputs, args, "ProbeProjectionToAttention")
        clean = [self.values[o].detach().clone() for o in outputs]
        n_heads, k_heads = self.values[args[0]].shape[1], self.values[args[1]].shape[1]
        hits: dict[Role, dict[int, set[int]]] = {r: {} for r in Role}
        offset = 0
        for i, y in enumerate(clean):
            for f in range(y.shape[-1]):
                probe = [t.clone() if j == i else t for j, t in enumerate(clean)]
                probe[i][..., f] = float("nan")
                result = self._probe(sub, extra, probe)
                touched = [
                    (role, set(torch.isnan(r).flatten(2).any(-1).any(0).nonzero().flatten().tolist()))
                    for role, r in zip(Role, result)
                ]
                touched = [(role, heads) for role, heads in touched if heads]
                if len(touched) != 1:
                    where = ", ".join(r.value for r, _ in touched) or "no attention input"
                    raise UnsupportedArchitectureError(
                        f"attention call {attention.name}: projection feature {f} of {outputs[i].name} reaches {where}; "
                        "each feature must feed exactly one of query, key, value"
                    )
                role, heads = touched[0]
                hits[role][offset + f] = heads
            offset += y.shape[-1]
        return self._group(attention, hits, n_heads, k_heads)

    def _group(self, attention: AttentionCall, hits: dict[Role, dict[int, set[int]]], n_heads: int, k_heads: int):
        query: list[list[int]] = [[] for _ in range(n_heads)]
        for f, heads in hits[Role.QUERY].items():
            if len(heads) != 1:
                raise UnsupportedArchitectureError(f"attention call {attention.name}: query feature {f} mixes heads {sorted(heads)}")
            query[heads.pop()].append(f)
        groups: dict[frozenset[int], int] = {}
        per_role: dict[Role, dict[frozenset[int], list[int]]] = {Role.KEY: {}, Role.VALUE: {}}
        for role in (Role.KEY, Role.VALUE):
            for f, heads in hits[role].items():
                per_role[role].setdefault(frozenset(heads), []).append(f)
        key_sets = sorted(per_role[Role.KEY], key=min)
        if sorted(per_role[Role.VALUE], key=min) != key_sets:
            raise UnsupportedArchitectureError(f"attention call {attention.name}: keys and values are grouped differently")
        covered = sorted(h for s in key_sets for h in s)
        if covered != list(range(k_heads)):
            raise UnsupportedArchitectureError(f"attention call {attention.name}: key heads {covered} overlap or miss heads")
        for g, s in enumerate(key_sets):
            groups[s] = g
        rep = n_heads // k_heads
        if k_heads == n_heads:
            group_of_head = tuple(next(groups[s] for s in key_sets if h in s) for h in range(n_heads))
        else:  # SDPA broadcasts key/value heads itself (enable_gqa)
            group_of_head = tuple(next(groups[s] for s in key_sets if (h // rep) in s) for h in range(n_heads))
        features = {
            Role.QUERY: query,
            Role.KEY: [sorted(per_role[Role.KEY][s]) for s in key_sets],
            Role.VALUE: [sorted(per_role[Role.VALUE][s]) for s in key_sets],
        }
        for role, per_head in features.items():
            if len({len(p) for p in per_head}) != 1 or not per_head[0]:
                raise UnsupportedArchitectureError(
                    f"attention call {attention.name}: {role.name.lower()} heads have unequal or empty widths"
                )
        return features, group_of_head

    def _z_features(self, attention: AttentionCall, z: fx.Node) -> list[list[int]]:
        body = descendants([attention.output]) & (ancestors([z]) | {z})
        sub, extra = extract(self.gm, body, [attention.output], [z], "ProbeAttentionToOutput")
        clean = self.values[attention.output]
        owner: dict[int, int] = {}
        for h in range(clean.shape[1]):
            probe = clean.clone()
            probe[:, h] = float("nan")
            nan = torch.isnan(self._probe(sub, extra, [probe])).flatten(0, -2).any(0)
            for f in nan.nonzero().flatten().tolist():
                if f in owner:
                    raise UnsupportedArchitectureError(f"attention call {attention.name}: output feature {f} mixes heads")
                owner[f] = h
        width = self.values[z].shape[-1]
        if sorted(owner) != list(range(width)):
            raise UnsupportedArchitectureError(f"attention call {attention.name}: some output-projection inputs come from no head")
        per_head = [[f for f in range(width) if owner[f] == h] for h in range(clean.shape[1])]
        return per_head

    def site(self, layer: int, attention: AttentionCall) -> AttentionSite:
        projections = self._projections(attention)
        if not projections:
            raise UnsupportedArchitectureError(f"attention call {attention.name}: no query/key/value projection found")
        normed = {first_with_shape(p.input, self.values, self.lead, up=True) for p in projections}
        if len(normed) != 1:
            raise UnsupportedArchitectureError(
                f"attention call {attention.name}: its projections read {len(normed)} different inputs; one shared input is required"
            )
        normed_node = normed.pop()
        outputs = [first_with_shape(p.node, self.values, self.lead, up=False) for p in projections]
        read = self.find_read(normed_node, f"attention call {attention.name}", itself=True)
        out_linear = self._output_linear(attention)
        z = first_with_shape(out_linear.input, self.values, self.lead, up=True)
        contribution, scale = self._contribution(attention, out_linear)
        role_features, group_of_head = self._role_features(attention, outputs)
        return AttentionSite(
            layer=layer,
            read=read,
            normed=normed_node,
            projections=projections,
            projection_outputs=outputs,
            attention=attention,
            z=z,
            output_linear=out_linear,
            contribution=contribution,
            output_scale=scale,
            role_features=role_features,
            z_features=self._z_features(attention, z),
            kv_group_of_head=group_of_head,
        )

    def _contribution(self, attention: AttentionCall, out_linear: Linear) -> tuple[fx.Node, float]:
        """The node the attention block adds to the residual stream, and a constant factor applied on the way
        (Granite's residual multiplier). Anything else between output projection and residual add (a norm of the
        attention output, as in Gemma 2 or OLMo 2) makes per-head contributions non-additive: rejected."""
        node = first_with_shape(out_linear.node, self.values, self.lead, up=False)
        scale = 1.0
        while not any(self._is_residual_add(u) for u in node.users):
            users = list(node.users)
            user = users[0] if len(users) == 1 else None
            other = None if user is None else next((a for a in user.args[:2] if a is not node), None)
            if user is not None and user.target in (aten.mul.Tensor, aten.div.Tensor) and isinstance(other, (int, float)):
                scale = scale * other if user.target is aten.mul.Tensor else scale / other
                node = user
                continue
            via = ", ".join(f"{u.target} ({u.name})" for u in users) or "nothing"
            raise UnsupportedArchitectureError(
                f"attention call {attention.name}: its output reaches the residual stream through {via}, not an "
                "addition; per-head contributions would not be additive (post-attention norms are not supported)"
            )
        return node, scale

    def decompose(self, node: fx.Node, stop: set[fx.Node]) -> list[fx.Node]:
        """The contributions whose sum is ``node``, following residual adds and identity casts/views."""
        if node in stop:
            return [node]
        if self._is_residual_add(node) and not node.kwargs:
            return self.decompose(node.args[0], stop) + self.decompose(node.args[1], stop)
        if node.target in SHAPE_OPS | _CAST_OPS and self.token_reshape(node.args[0], node):
            return self.decompose(node.args[0], stop)
        return [node]

    def token_reshape(self, source: fx.Node, node: fx.Node) -> bool:
        """Whether ``node`` holds ``source``'s values, at most with the token dimensions merged or split
        (OPT runs its MLP residual on [batch * seq, d])."""
        before, after = self.values[source], self.values[node]
        return (
            isinstance(before, torch.Tensor)
            and isinstance(after, torch.Tensor)
            and before.dtype == after.dtype
            and before.shape[-1] == after.shape[-1]
            and before.numel() == after.numel()
        )

    def stream_shaped(self, node: fx.Node) -> fx.Node:
        """Walk up through token reshapes to the [batch, seq, d] form of a residual-stream node."""
        while node.target in SHAPE_OPS and self.values[node].dim() != len(self.lead) + 1 and self.token_reshape(node.args[0], node):
            node = node.args[0]
        return node


def analyse(gm: fx.GraphModule, example: torch.Tensor) -> ModelLayout:
    """Find attention sites, MLPs, embedding and residual structure of a traced causal LM."""
    a = _Analysis(gm, example)
    calls = a.find_attention()
    if not calls:
        raise UnsupportedArchitectureError(
            "no attention call found: the graph has neither an aten.scaled_dot_product_attention op nor the "
            "matmul -> softmax -> matmul pattern of eager attention over [batch, heads, seq, dim] tensors"
        )
    sites = [a.site(i, c) for i, c in enumerate(calls)]
    embed = sites[0].read
    stop = {embed} | {s.contribution for s in sites}
    final_read = a.find_read(a.logits, "the logits")
    leaves: dict[fx.Node, list[fx.Node]] = {}
    mlp_contributions: list[fx.Node] = []
    pending = [s.read for s in sites if s.read is not embed] + [final_read]
    while pending:
        read = pending.pop()
        if read in leaves:
            continue
        parts = a.decompose(read, stop)
        for part in parts:
            if part not in a.activations:
                raise UnsupportedArchitectureError(f"residual stream at {read.name} adds a constant ({part.name}); not supported")
            if part not in stop:
                stop.add(part)
                mlp_contributions.append(part)
                pending.append(a.stream_shaped(a.find_read(part, f"MLP output {part.name}")))
        leaves[read] = parts
    mlps = []
    for c in sorted(mlp_contributions, key=a.order.__getitem__):
        read = a.stream_shaped(a.find_read(c, f"MLP output {c.name}"))
        upstream = ancestors([read]) | {read}
        layer = max((s.layer for s in sites if s.read in upstream), default=0)
        if any(m.layer == layer for m in mlps):
            raise UnsupportedArchitectureError(f"two MLPs found after attention layer {layer} ({c.name})")
        mlps.append(MLPSite(layer=layer, read=read, contribution=c))
    for s in sites:
        if s.read is not embed and s.read not in leaves:
            leaves[s.read] = a.decompose(s.read, stop)
    leaves[embed] = [embed]
    return ModelLayout(
        values=a.values,
        lead=a.lead,
        embed=embed,
        sites=sites,
        mlps=mlps,
        final_read=final_read,
        logits=a.logits,
        outputs=a.outputs,
        leaves=leaves,
    )
