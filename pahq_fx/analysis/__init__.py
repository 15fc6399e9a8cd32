"""Find the attention sites, MLPs and residual stream of a traced causal LM, from the graph alone.

What is recognised (docs/families.md, "What the pass recognises"):

* an attention site is an ``aten.scaled_dot_product_attention`` call, or eager attention:
  ``matmul(q, k^T)`` -> ops with constants (scale, mask, sinks; the scores' own maximum may be subtracted) ->
  softmax -> ``matmul(p, v)`` over [batch, heads, ...], or ``bmm`` / ``baddbmm`` (an ALiBi bias) over
  [batch * heads, ...], read at the [batch, heads, seq, dim] tensors the factors are regrouped from;
* its projections are the linear ops (``aten.linear``, ``aten.addmm``, ``aten.mm``, ``aten.matmul`` with a
  constant weight) reached by walking back from the query, key and value; they must all read one input; linear
  ops reading that input and reaching the output projection's input are per-head gates, probed into the
  query projections of the heads whose outputs they reach;
* the *read* of a component (its residual-stream input) is the nearest dominator of its input that is a
  residual ``add`` or flows into one outside the component; the ops between read and projections are the
  norm, applied per head after the split;
* the output projection is the first linear op after the attention; its input features are assigned to
  heads, and the projection's query/key/value features to (role, head), by pushing NaN probes through the
  ops in between (reshapes, rotary embeddings, grouped-query repeats, ...), so no layout is written per model
  family; where a norm across heads spreads the NaNs (OLMo 2's q/k norm, BitNet's sub-norm), infinity probes
  find the layout and the inputs concerned are *coupled* (they reach every head of the layer);
* between output projection and residual add: reshapes and a constant factor, or a function of the block
  output alone (a post-attention norm, a component of its own);
* the embedding is the first attention layer's read, or, where residual adds ``x + f(x)`` come before it (a
  hybrid's convolution or state-space layers), the ``x`` of the first of them;
* residual reads are decomposed into sums of contributions through ``add`` ops (and casts and reshapes of the
  token dimensions); a contribution that is not an attention output nor the embedding is a whole component (an
  MLP, or a hybrid's mixer), whose read is found the same way (above sums of its own branches) and must flow on
  by addition too (post-layer-norm blocks are refused); two such branches reading one stream and summed before
  the residual add (a shared expert beside routed experts) are one MLP. Several components may follow one
  attention layer, and come before the first one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..errors import UnsupportedArchitectureError
from ..ir.graph_utils import SHAPE_OPS, ancestors, descendants, node_arg
from .attention import AttentionMatcher
from .graph_facts import ADD_TARGETS, GraphFacts
from .layout import AttentionCall, AttentionSite, Linear, MLPSite, ModelLayout
from .probes import HeadProbe
from .residual import CAST_OPS, ResidualStream

__all__ = ["AttentionCall", "AttentionSite", "Linear", "MLPSite", "ModelLayout", "analyse"]


def analyse(gm: fx.GraphModule, example: torch.Tensor) -> ModelLayout:
    """Find attention sites, MLPs, embedding and residual structure of a traced causal LM."""
    facts = GraphFacts(gm, example)
    residual = ResidualStream(facts)
    matcher = AttentionMatcher(facts, residual, HeadProbe(facts))
    calls = matcher.find_attention()
    if not calls:
        raise UnsupportedArchitectureError(
            "no attention call found: the graph has neither an aten.scaled_dot_product_attention op nor the "
            "matmul -> softmax -> matmul pattern of eager attention over [batch, heads, seq, dim] tensors "
            "(or bmm / baddbmm over [batch * heads, seq, dim])"
        )
    sites = [matcher.site(i, c) for i, c in enumerate(calls)]
    embed = _embedding(facts, residual, sites[0].read)
    final_read = residual.find_read(facts.logits, "the logits")
    joins: set[fx.Node] = set()  # sums of MLP branches kept whole (a shared expert beside routed experts)
    while (found := _find_mlps(facts, residual, sites, embed, final_read, joins)).join is not None:
        joins.add(found.join)
    mlps, leaves, stop = found.mlps, found.leaves, found.stop
    for s in sites:
        if s.read is not embed and s.read not in leaves:
            leaves[s.read] = residual.decompose(s.read, stop)
    leaves[embed] = [embed]
    for s in sites:
        if s.output_norm is not None:  # a post-attention norm reads the block output alone
            leaves[s.contribution] = [s.contribution]
    return ModelLayout(
        values=facts.values,
        lead=facts.lead,
        embed=embed,
        sites=sites,
        mlps=mlps,
        final_read=final_read,
        logits=facts.logits,
        outputs=facts.outputs,
        leaves=leaves,
    )


@dataclass
class _FoundMLPs:
    """The MLPs and the contributions every residual read sums, or a sum of two MLP branches (``join``) to keep whole."""

    mlps: list[MLPSite]
    leaves: dict[fx.Node, list[fx.Node]]
    stop: set[fx.Node]
    join: fx.Node | None = None


def _find_mlps(
    facts: GraphFacts,
    residual: ResidualStream,
    sites: list[AttentionSite],
    embed: fx.Node,
    final_read: fx.Node,
    joins: set[fx.Node],
) -> _FoundMLPs:
    """The whole components: every contribution to a residual read that is neither an attention output nor the
    embedding, each with the attention layer it follows and its position among the components after that layer.

    Where two contributions after one attention layer read the same stream and are summed before the residual add
    (a mixture of experts with a shared expert), they are one MLP: ``join`` is the node that sums them, for the
    caller to keep whole (in ``stop``) and search again."""
    known = {embed} | {s.residual_contribution for s in sites}
    stop = known | joins  # where decomposing a read ends: known components, and sums kept whole
    leaves: dict[fx.Node, list[fx.Node]] = {}
    mlp_contributions: list[fx.Node] = []
    mlp_reads: dict[fx.Node, fx.Node] = {}
    pending = [s.read for s in sites if s.read is not embed] + [final_read]
    while pending:
        read = pending.pop()
        if read in leaves:
            continue
        parts = residual.decompose(read, stop)
        for part in parts:
            if part not in facts.activations:
                raise UnsupportedArchitectureError(f"residual stream at {read.name} adds a constant ({part.name}); not supported")
            if part not in known:
                known.add(part)
                stop.add(part)
                mlp_contributions.append(part)
                read_of_part = residual.find_read(part, f"MLP output {part.name}")
                while _branch_sum(read_of_part, part):  # experts summed inside the MLP, normed after (AFMoE)
                    read_of_part = residual.find_read(read_of_part, f"MLP output {part.name}")
                _check_carried_on(read_of_part, part)
                mlp_reads[part] = residual.stream_shaped(read_of_part)
                pending.append(mlp_reads[part])
        leaves[read] = parts
    mlps: list[MLPSite] = []
    for c in sorted(mlp_contributions, key=facts.order.__getitem__):
        read = mlp_reads[c]
        upstream = ancestors([read]) | {read}
        layer = max((s.layer for s in sites if s.read in upstream), default=-1)
        for other in (m for m in mlps if m.layer == layer and m.read is read):
            join = _sum_of(facts, residual, other.contribution, c, stop)
            if join is not None:
                return _FoundMLPs(mlps, leaves, stop, join)
        position = sum(m.layer == layer for m in mlps)
        mlps.append(MLPSite(layer=layer, read=read, contribution=c, position=position))
    return _FoundMLPs(mlps, leaves, stop)


def _embedding(facts: GraphFacts, residual: ResidualStream, first_read: fx.Node) -> fx.Node:
    """The embedding: the stream the first attention layer reads, unless residual adds ``x + f(x)`` come before it
    (a hybrid's convolution or state-space layers, an MLP), whose ``f(x)`` are then components of their own: the
    stream is followed back through them (and identity casts and token reshapes, as reads are decomposed) to where
    it starts. Sums of embeddings (token plus positions computed from the tokens, as in RoBERTa) add terms neither
    of which is computed from the other, and are the embedding."""
    node, through_component = first_read, False
    while True:
        if facts.is_residual_add(node) and _adds_to_own_input(node):
            a, b = node_arg(node, 0), node_arg(node, 1)
            node, through_component = (a if a in ancestors([b]) else b), True
        elif node.target in SHAPE_OPS | CAST_OPS and residual.token_reshape(node_arg(node, 0), node):
            node = node_arg(node, 0)
        else:
            return node if through_component else first_read


def _adds_to_own_input(add: fx.Node) -> bool:
    """Whether one term of ``add`` is computed from the other: the residual pattern ``x + f(x)``."""
    a, b = node_arg(add, 0), node_arg(add, 1)
    return a in ancestors([b]) or b in ancestors([a])


def _branch_sum(read: fx.Node, part: fx.Node) -> bool:
    """Whether ``read`` is a sum of two branches of the component ``part`` rather than a residual add: all of it
    flows into ``part``, and neither term is computed from the other."""
    if read.target not in ADD_TARGETS or not all(isinstance(a, fx.Node) for a in read.args[:2]):
        return False
    inside = ancestors([part]) | {part}
    return all(u in inside for u in read.users) and not _adds_to_own_input(read)


def _check_carried_on(read: fx.Node, part: fx.Node) -> None:
    """A residual sum must flow on by addition. Where all of it flows into the one contribution read from it (a
    norm of the sum, as in post-layer-norm blocks), later layers read a transform of the stream, not a sum."""
    inside = ancestors([part]) | {part}
    if all(u in inside for u in read.users):
        raise UnsupportedArchitectureError(
            f"the residual stream at {read.name} is not carried on by an addition: all of it flows into {part.name} "
            f"({part.target}), which later layers read instead. Blocks that normalise the residual sum after each add "
            "(post-layer-norm, as in BERT, GPT-1 or OPT-350m) make per-component contributions non-additive; not supported"
        )


def _sum_of(facts: GraphFacts, residual: ResidualStream, a: fx.Node, b: fx.Node, stop: set[fx.Node]) -> fx.Node | None:
    """The first node after both ``a`` and ``b`` if it is exactly their sum (through adds, casts and token
    reshapes), else None."""
    after_a, after_b = descendants([a]), descendants([b])
    join = min(after_a & after_b, key=facts.order.__getitem__, default=None)
    if join is None or sorted(residual.decompose(join, stop), key=facts.order.__getitem__) != sorted(
        [a, b], key=facts.order.__getitem__
    ):
        return None
    return join
