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

import torch
from torch import fx

from ..errors import UnsupportedArchitectureError
from ..graph_utils import ancestors
from .attention import AttentionMatcher
from .graph_facts import GraphFacts
from .layout import AttentionCall, AttentionSite, Linear, MLPSite, ModelLayout
from .probes import HeadProbe
from .residual import ResidualStream

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
            "matmul -> softmax -> matmul pattern of eager attention over [batch, heads, seq, dim] tensors"
        )
    sites = [matcher.site(i, c) for i, c in enumerate(calls)]
    embed = sites[0].read
    stop = {embed} | {s.contribution for s in sites}
    final_read = residual.find_read(facts.logits, "the logits")
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
            if part not in stop:
                stop.add(part)
                mlp_contributions.append(part)
                mlp_reads[part] = residual.stream_shaped(residual.find_read(part, f"MLP output {part.name}"))
                pending.append(mlp_reads[part])
        leaves[read] = parts
    mlps = []
    for c in sorted(mlp_contributions, key=facts.order.__getitem__):
        read = mlp_reads[c]
        upstream = ancestors([read]) | {read}
        layer = max((s.layer for s in sites if s.read in upstream), default=0)
        if any(m.layer == layer for m in mlps):
            raise UnsupportedArchitectureError(f"two MLPs found after attention layer {layer} ({c.name})")
        mlps.append(MLPSite(layer=layer, read=read, contribution=c))
    for s in sites:
        if s.read is not embed and s.read not in leaves:
            leaves[s.read] = residual.decompose(s.read, stop)
    leaves[embed] = [embed]
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
