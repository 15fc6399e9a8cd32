"""Attention sites: the attention calls, their query/key/value projections, output projection and contribution."""

from __future__ import annotations

from torch import fx

from ..errors import UnsupportedArchitectureError
from ..ir.graph_utils import ancestors, descendants, first_with_shape, input_nodes
from ..ir.names import Role
from .graph_facts import GraphFacts
from .layout import AttentionCall, AttentionSite, Linear, aten
from .probes import HeadProbe
from .residual import ResidualStream

ATTENTION_TARGETS = {aten.scaled_dot_product_attention.default}
SOFTMAX_TARGETS = {aten.softmax.int, aten._softmax.default}
# Matrix products of eager attention, and which arguments are the two factors: ``matmul`` over [batch, heads, ...],
# ``bmm`` and ``baddbmm`` (a bias such as ALiBi's first) over [batch * heads, ...] as in Bloom.
PRODUCT_FACTORS: dict[fx.node.Target, tuple[int, int]] = {
    aten.matmul.default: (0, 1),
    aten.bmm.default: (0, 1),
    aten.baddbmm.default: (1, 2),
}
# Ops that only regroup a tensor's dimensions: between a [batch * heads, ...] factor and its [batch, heads, ...] form.
REGROUP_TARGETS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.transpose.int,
    aten.permute.default,
    aten.contiguous.default,
    aten.clone.default,
    aten.expand.default,
}


class AttentionMatcher:
    """Finds every attention call and derives its site: projections, reads, output, per-head features."""

    def __init__(self, facts: GraphFacts, residual: ResidualStream, probe: HeadProbe) -> None:
        self.facts = facts
        self.residual = residual
        self.probe = probe

    def find_attention(self) -> list[AttentionCall]:
        """SDPA calls, and eager attention: ``matmul(q, k^T)`` -> ops with constants (or the scores' own maximum)
        -> softmax -> ``matmul(p, v)`` (or their ``bmm`` / ``baddbmm`` forms over [batch * heads, ...], read
        through their [batch, heads, ...] views)."""
        calls = []
        for node in self.facts.gm.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in ATTENTION_TARGETS:
                calls.append(AttentionCall(node.args[0], node.args[1], node.args[2], node))
            elif node.target in SOFTMAX_TARGETS and node in self.facts.activations:
                call = self._eager_attention(node)
                if call is not None:
                    calls.append(call)
        return calls

    def _eager_attention(self, softmax: fx.Node) -> AttentionCall | None:
        scores = self._scores_input(softmax)
        while scores is not None and scores.target not in PRODUCT_FACTORS:
            scores = self._scores_input(scores)
        factors = None if scores is None else self._factors(scores)
        if factors is None:
            return None
        probs = softmax
        while len(probs.users) == 1:
            user = next(iter(probs.users))
            weighted = self._factors(user) if user.target in PRODUCT_FACTORS else None
            if weighted is not None and weighted[0] is probs:
                query = self._heads_form(factors[0], up=True)
                key = self._heads_form(factors[1], up=True, transposed=True)
                value = self._heads_form(weighted[1], up=True)
                output = self._heads_form(user, up=False)
                if query is None or key is None or value is None or output is None:
                    return None
                return AttentionCall(query, key, value, output)
            if self.facts.single_activation_input(user) is not probs:
                return None
            probs = user
        return None

    def _scores_input(self, node: fx.Node) -> fx.Node | None:
        """The one token-dependent input ``node`` computes the scores from, or None. Inputs that are themselves
        computed from another input alone, such as ``x - x.max()`` (GPT-OSS writes out the stable softmax around
        its attention sinks), do not count as a second input."""
        inputs = [p for p in input_nodes(node) if p in self.facts.activations]
        return next((x for x in inputs if all(self._derived_from(o, x) for o in inputs if o is not x)), None)

    def _derived_from(self, node: fx.Node | None, source: fx.Node) -> bool:
        """Whether ``node`` is computed from ``source`` alone, through ops with one token-dependent input."""
        while node is not None and node is not source:
            node = self.facts.single_activation_input(node)
        return node is source

    def _factors(self, product: fx.Node) -> tuple[fx.Node, fx.Node] | None:
        """The two token-dependent factors of a matrix product, or None."""
        i, j = PRODUCT_FACTORS[product.target]
        a, b = product.args[i], product.args[j]
        if isinstance(a, fx.Node) and isinstance(b, fx.Node) and a in self.facts.activations and b in self.facts.activations:
            return a, b
        return None

    def _heads_form(self, node: fx.Node, up: bool, transposed: bool = False) -> fx.Node | None:
        """``node`` itself if it is [batch, heads, seq, dim], else the nearest such tensor it is a regrouping of (up:
        the ops it comes from; down: the ops its value flows through alone): Bloom's [batch * heads, ...] factors,
        and a key transposed for ``q @ k^T`` (GPT-J), are read where they are still [batch, heads, seq, dim]. Failing
        that, the nearest [batch, heads, ...] tensor (keys of another length than the queries).

        ``transposed``: ``node`` is ``k^T``; where the head dimension equals the sequence length its shape looks
        right already, so a form reached back through the transpose of the last two dimensions comes first."""
        if transposed:
            undone = self._heads_form_through_transpose(node)
            if undone is not None:
                return undone
        current: fx.Node | None = node
        nearest: fx.Node | None = None
        while current is not None:
            value = self.facts.values[current]
            if value.dim() == 4 and value.shape[0] == self.facts.lead[0]:
                if self._is_heads_form(current):
                    return current
                nearest = nearest or current
            if up:
                current = self.facts.single_activation_input(current) if current.target in REGROUP_TARGETS else None
            else:
                users = list(current.users)
                current = users[0] if len(users) == 1 and users[0].target in REGROUP_TARGETS else None
        return nearest

    def _heads_form_through_transpose(self, node: fx.Node) -> fx.Node | None:
        """The first [batch, heads, seq, dim] tensor above a transpose of the last two dimensions, walking up
        through regroupings from ``node``; None if the walk passes no such transpose."""
        current: fx.Node | None = node
        undone = False
        while current is not None and current.target in REGROUP_TARGETS:
            undone = undone or _swaps_last_two(current, self.facts.values[current].dim())
            current = self.facts.single_activation_input(current)
            if undone and current is not None and self._is_heads_form(current):
                return current
        return None

    def _is_heads_form(self, node: fx.Node) -> bool:
        """Whether ``node`` has the shape [batch, heads, seq, dim]."""
        value = self.facts.values[node]
        return value.dim() == 4 and (value.shape[0], value.shape[2]) == self.facts.lead

    def _projections(self, attention: AttentionCall) -> list[Linear]:
        found: dict[fx.Node, Linear] = {}
        seen: set[fx.Node] = set()
        stack = list(attention.inputs)
        while stack:
            n = stack.pop()
            if n in seen or n not in self.facts.activations:
                continue
            seen.add(n)
            lin = self.facts.linear(n)
            if lin is not None:
                found[n] = lin
                continue
            if n is self.facts.source:
                raise UnsupportedArchitectureError(
                    f"attention call {attention.name}: no linear query/key/value projection between it and the input"
                )
            stack.extend(input_nodes(n))
        return sorted(found.values(), key=lambda l: self.facts.order[l.node])

    def _gates(self, normed: fx.Node, projections: list[Linear], z: fx.Node) -> list[Linear]:
        """Linear ops besides the query/key/value projections that read the same input and reach the output
        projection's input: per-head output gates (AFMoE, Laguna). The probes assign their features to heads."""
        known = {p.node for p in projections}
        between = descendants([normed]) & ancestors([z])
        gates = [self.facts.linear(n) for n in between if n not in known]
        return [
            g for g in gates if g is not None and first_with_shape(g.input, self.facts.values, self.facts.lead, up=True) is normed
        ]

    @staticmethod
    def _reaches_output_around_attention(attention: AttentionCall, outputs: list[fx.Node], z: fx.Node) -> bool:
        """Whether a projection output reaches the output projection's input besides through the attention: a gate
        computed from part of a projection (Qwen3-Next and Qwen3.5 compute each head's gate with its query)."""
        through = ancestors(attention.inputs) | set(attention.inputs) | descendants([attention.output]) | {attention.output}
        through |= descendants(attention.inputs) & ancestors([attention.output])  # eager attention's scores and softmax
        return bool(descendants(outputs) & ancestors([z]) - through)

    def _output_linear(self, attention: AttentionCall) -> Linear:
        frontier, seen = [attention.output], set()
        while frontier:
            n = min(frontier, key=self.facts.order.__getitem__)
            frontier.remove(n)
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                lin = self.facts.linear(u)
                if lin is not None:
                    return lin
                frontier.append(u)
        raise UnsupportedArchitectureError(f"attention call {attention.name}: no output projection (linear op) after it")

    def site(self, layer: int, attention: AttentionCall) -> AttentionSite:
        projections = self._projections(attention)
        if not projections:
            raise UnsupportedArchitectureError(f"attention call {attention.name}: no query/key/value projection found")
        reads = {p.node.name: first_with_shape(p.input, self.facts.values, self.facts.lead, up=True) for p in projections}
        normed = set(reads.values())
        if len(normed) != 1:
            which = ", ".join(f"{name} reads {node.name}" for name, node in reads.items())
            raise UnsupportedArchitectureError(
                f"attention call {attention.name}: its projections read {len(normed)} different inputs ({which}); one "
                "shared input is required (a projection of a projection, such as multi-head latent attention's "
                "compressed keys and values, is not supported)"
            )
        normed_node = normed.pop()
        read = self.residual.find_read(normed_node, f"attention call {attention.name}", itself=True)
        out_linear = self._output_linear(attention)
        z = first_with_shape(out_linear.input, self.facts.values, self.facts.lead, up=True)
        gates = self._gates(normed_node, projections, z)
        projections = sorted(projections + gates, key=lambda l: self.facts.order[l.node])
        outputs = [first_with_shape(p.node, self.facts.values, self.facts.lead, up=False) for p in projections]
        contribution, scale, output_norm = self._contribution(attention, out_linear)
        z_features, output_coupled = self.probe.z_features(attention, z)
        gated = bool(gates) or self._reaches_output_around_attention(attention, outputs, z)
        roles = self.probe.role_features(attention, outputs, (z, z_features) if gated else None)
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
            role_features=roles.features,
            z_features=z_features,
            kv_group_of_head=roles.group_of_head,
            coupled_roles=frozenset(Role) if output_coupled else roles.coupled,
            output_norm=output_norm,
        )

    def _contribution(self, attention: AttentionCall, out_linear: Linear) -> tuple[fx.Node, float, fx.Node | None]:
        """The attention block's output (the sum of its heads), a constant factor applied on the way (Granite's
        residual multiplier), and the post-attention norm's output where the block output is normalised before
        the residual add (Gemma 2, OLMo 2; else None). Anything else between output projection and residual add
        makes per-head contributions non-additive: rejected."""
        node = first_with_shape(out_linear.node, self.facts.values, self.facts.lead, up=False)
        scale = 1.0
        while not any(self.facts.is_residual_add(u) for u in node.users):
            users = list(node.users)
            user = users[0] if len(users) == 1 else None
            other = None if user is None else next((a for a in user.args[:2] if a is not node), None)
            if user is not None and user.target in (aten.mul.Tensor, aten.div.Tensor) and isinstance(other, (int, float)):
                scale = scale * other if user.target is aten.mul.Tensor else scale / other
                node = user
                continue
            norm = self._output_norm(node)
            if norm is not None:
                return node, scale, norm
            via = ", ".join(f"{u.target} ({u.name})" for u in users) or "nothing"
            raise UnsupportedArchitectureError(
                f"attention call {attention.name}: its output reaches the residual stream through {via}, neither an "
                "addition nor a function of the attention output alone (a post-attention norm); per-head "
                "contributions would not be additive"
            )
        return node, scale, None

    def _output_norm(self, block_output: fx.Node) -> fx.Node | None:
        """The node that a function of ``block_output`` alone (a post-attention norm) adds to the residual stream,
        or None. Every node between them must read only ``block_output``, each other and constants, and all of
        ``block_output`` must flow into them: then the norm is a component of its own, reading the heads' sum."""
        after = descendants([block_output])
        shape = self.facts.values[block_output].shape
        for node in sorted(after, key=self.facts.order.__getitem__):
            if not any(self._adds_to_stream(u, node, after) for u in node.users):
                continue
            region = after & (ancestors([node]) | {node})
            inside = region | {block_output}
            if self.facts.values[node].shape != shape or not all(
                p in inside for n in region for p in input_nodes(n) if p in self.facts.activations
            ):
                return None
            if any(u not in inside for n in inside - {node} for u in n.users):
                return None
            return node
        return None

    def _adds_to_stream(self, add: fx.Node, node: fx.Node, after: set[fx.Node]) -> bool:
        """Whether ``add`` is a residual add of ``node`` and a stream that does not come from the block output."""
        if not self.facts.is_residual_add(add):
            return False
        others = [a for a in add.args[:2] if a is not node]
        return len(others) == 1 and others[0] not in after


def _swaps_last_two(node: fx.Node, ndim: int) -> bool:
    """Whether ``node`` is a transpose of its input's last two dimensions (``k.transpose(-1, -2)``)."""
    if node.target is aten.transpose.int:
        return {d % ndim for d in node.args[1:3] if isinstance(d, int)} == {ndim - 2, ndim - 1}
    return False
