"""The per-head split pass: traced causal LM -> per-head GraphModule.

Each attention block becomes an :class:`~pahq_fx.ir.modules.AttentionBlock` (per-head inputs, norm, projections
and output contributions; the original graph's ops in between, reused unchanged), each MLP and post-attention norm
a component of its own, and every traced output is placed where the split model computes it.

The top-level graph reads like the residual stream: ``embed, aux = prelude(ids)``; every read is the sum of
the contributions upstream of it; ``logits = unembed(final read)``.
"""

from __future__ import annotations

import copy
import functools
import operator
import warnings
from typing import Any

import torch
from torch import fx, nn

from ..analysis import AttentionSite, MLPSite, ModelLayout, analyse
from ..errors import UnsupportedArchitectureError
from ..ir import graph_meta, names
from ..ir.graph_utils import ancestors, descendants, extract
from ..ir.head_graph import Component, HeadGraph, LayerInfo
from ..ir.modules import AttentionBlock, PerHeadLinear, StreamShaped
from ..ir.names import Role
from ..ir.structure import GraphOutput, OutputHome, Step, StepKind, Structure
from ..model_io import ExampleInputs, input_ids_from
from .weights import check_float32_weights

aten = torch.ops.aten


class PerHeadModel(nn.Module):
    """Executable form of the split model; traced into the GraphModule that :func:`split_heads` returns."""

    def __init__(
        self,
        prelude: fx.GraphModule,
        n_aux: int,
        blocks: dict[str, nn.Module],
        steps: list[Step],
        unembed: fx.GraphModule,
        final_reads: tuple[str, ...],
        final_aux: tuple[int, ...],
        outputs: tuple[GraphOutput, ...] = (GraphOutput(OutputHome.LOGITS),),
    ) -> None:
        super().__init__()
        self.outputs = outputs
        self.prelude = prelude
        self.n_aux = n_aux
        for name, block in blocks.items():
            self.add_module(name, block)
        self.steps = steps
        self.unembed = unembed
        self.final_reads = final_reads
        self.final_aux = final_aux

    def forward(self, input_ids: torch.Tensor) -> Any:
        """The logits, or (where the traced graph had more outputs) all of them in the traced order."""
        out = self.prelude(input_ids)
        aux = [out[i + 1] for i in range(self.n_aux)]
        stream = {names.EMBED: out[0]}
        extras: dict[str, Any] = {}
        with_extras = {o.component for o in self.outputs if o.home is OutputHome.ATTENTION}
        for step in self.steps:
            read = functools.reduce(operator.add, [stream[r] for r in step.reads])
            block = getattr(self, step.module)
            args = [aux[i] for i in step.aux]
            if step.kind is StepKind.ATTENTION and step.name in with_extras:
                result = block.from_stream(read, *args, extra_outputs=True)
                stream[step.name], extras[step.name] = block.combine(result[0]), result[1]
            elif step.kind is StepKind.ATTENTION:
                stream[step.name] = block.combine(block.from_stream(read, *args))
            else:
                stream[step.name] = block(read, *args)
        final = functools.reduce(operator.add, [stream[r] for r in self.final_reads])
        unembedded = self.unembed(final, *[aux[i] for i in self.final_aux])
        if len(self.outputs) == 1:
            return unembedded
        logits = unembedded[0] if any(o.home is OutputHome.UNEMBED for o in self.outputs) else unembedded
        values = []
        for o in self.outputs:
            if o.home is OutputHome.LOGITS:
                values.append(logits)
            elif o.home is OutputHome.STREAM:
                values.append(functools.reduce(operator.add, [stream[r] for r in o.reads]))
            elif o.home is OutputHome.PRELUDE:
                values.append(aux[o.index])
            elif o.home is OutputHome.ATTENTION:
                values.append(extras[o.component][o.index])
            else:
                values.append(unembedded[1 + o.index])
        return tuple(values)


class _LeafTracer(fx.Tracer):
    """Keeps the prelude, blocks, MLPs and unembedding as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (AttentionBlock, StreamShaped, fx.GraphModule)) or super().is_leaf_module(m, qualname)


def _per_role_linear(site: AttentionSite, role: Role, weight: torch.Tensor, bias: torch.Tensor | None) -> PerHeadLinear:
    features = site.role_features[role]
    w = torch.stack([weight[f] for f in features])
    b = None if bias is None else torch.stack([bias[f] for f in features])
    return PerHeadLinear(w, b)


def _scatter_indices(site: AttentionSite, widths: list[int], device: torch.device) -> list[torch.Tensor]:
    """For each projection output, where each of its features sits in the concatenated per-head outputs."""
    position: dict[int, int] = {}
    for role in Role:
        for features in site.role_features[role]:
            for f in features:
                position[f] = len(position)
    indices, offset = [], 0
    for width in widths:
        indices.append(torch.tensor([position[offset + j] for j in range(width)], dtype=torch.long, device=device))
        offset += width
    return indices


class _Builder:
    def __init__(self, gm: fx.GraphModule, layout: ModelLayout) -> None:
        self.gm = gm
        self.layout = layout
        self.stream = descendants([layout.embed]) | {layout.embed}
        self.aux: list[fx.Node] = []

    def component(
        self, nodes: set[fx.Node], inputs: list[fx.Node], outputs: fx.Node | list[fx.Node], name: str
    ) -> tuple[fx.GraphModule, tuple[int, ...]]:
        module, extra = extract(self.gm, nodes, inputs, outputs if isinstance(outputs, list) else [outputs], name)
        for e in extra:
            if e in self.stream:
                raise UnsupportedArchitectureError(f"{name}: reads the residual stream at {e.name} besides its own input")
            if e not in self.aux:
                self.aux.append(e)
        return module, tuple(self.aux.index(e) for e in extra)

    def between(self, start: list[fx.Node], end: fx.Node) -> set[fx.Node]:
        return descendants(start) & (ancestors([end]) | {end})

    def attention(self, site: AttentionSite, extras: list[fx.Node]) -> tuple[AttentionBlock, tuple[int, ...]]:
        name = names.attention(site.layer)
        norm, norm_aux = self.component(self.between([site.read], site.normed), [site.read], site.normed, f"Norm_{name}")
        core_nodes = self.between(site.projection_outputs, site.z).union(
            *(self.between(site.projection_outputs, e) for e in extras)
        )
        core, core_aux = self.component(core_nodes, site.projection_outputs, [site.z, *extras], f"Core_{name}")
        weight = torch.cat([p.weight for p in site.projections])
        biases = [
            p.bias if p.bias is not None else torch.zeros(p.weight.shape[0], device=p.weight.device) for p in site.projections
        ]
        bias = None if all(p.bias is None for p in site.projections) else torch.cat(biases)
        q, k, v = (_per_role_linear(site, role, weight, bias) for role in Role)
        widths = [p.weight.shape[0] for p in site.projections]
        w_o = site.output_linear.weight * site.output_scale
        o_bias = None if site.output_linear.bias is None else site.output_linear.bias * site.output_scale
        o = PerHeadLinear(torch.stack([w_o[:, f] for f in site.z_features]), None)
        z_order = torch.tensor([f for features in site.z_features for f in features], dtype=torch.long, device=weight.device)
        block = AttentionBlock(
            site.layer,
            norm,
            len(norm_aux),
            q,
            k,
            v,
            _scatter_indices(site, widths, weight.device),
            core,
            z_order,
            o,
            o_bias,
            site.kv_group_of_head,
            len(extras),
        )
        return block, norm_aux + core_aux


def _contribution_names(layout: ModelLayout) -> dict[fx.Node, str]:
    out = {layout.embed: names.EMBED}
    out.update({s.contribution: names.attention(s.layer) for s in layout.sites})
    out.update({s.output_norm: names.attention_output(s.layer) for s in layout.sites if s.output_norm is not None})
    out.update({m.contribution: names.mlp(m.layer, m.position) for m in layout.mlps})
    return out


def _place_outputs(
    layout: ModelLayout, builder: _Builder, contribution_names: dict[fx.Node, str]
) -> tuple[tuple[GraphOutput, ...], dict[int, list[fx.Node]], list[fx.Node]]:
    """Where each graph output is computed in the split model, so outputs besides the logits (key/value caches,
    hidden states) come out of the split graph itself. Returns the output plan, the extra outputs of each
    attention core (by layer) and those of the unembedding. Registers stream-independent outputs as prelude aux."""
    plan: list[GraphOutput] = []
    core_extras: dict[int, list[fx.Node]] = {s.layer: [] for s in layout.sites}
    unembed_extras: list[fx.Node] = []
    unembed_region = descendants([layout.final_read])
    # What each attention core computes: downstream of its projections, not of (or at) its output z.
    cores = (
        [(s, descendants(s.projection_outputs) - descendants([s.z]) - {s.z}) for s in layout.sites]
        if len(layout.outputs) > 1
        else []
    )
    for node in layout.outputs:
        if node is layout.logits:
            plan.append(GraphOutput(OutputHome.LOGITS))
        elif node is layout.embed or node in layout.leaves:
            plan.append(
                GraphOutput(OutputHome.STREAM, reads=tuple(contribution_names[l] for l in layout.leaves.get(node, [node])))
            )
        elif node not in builder.stream:
            if node not in builder.aux:
                builder.aux.append(node)
            plan.append(GraphOutput(OutputHome.PRELUDE, index=builder.aux.index(node)))
        elif site := next((s for s, core in cores if node in core), None):
            core_extras[site.layer].append(node)
            plan.append(
                GraphOutput(OutputHome.ATTENTION, component=names.attention(site.layer), index=len(core_extras[site.layer]) - 1)
            )
        elif node in unembed_region:
            unembed_extras.append(node)
            plan.append(GraphOutput(OutputHome.UNEMBED, index=len(unembed_extras) - 1))
        else:
            raise UnsupportedArchitectureError(
                f"graph output {node.name} is computed inside an MLP or a norm, which the split model does not expose; "
                "only logits, key/value caches, hidden states and stream-independent values can be returned"
            )
    return tuple(plan), core_extras, unembed_extras


def _drop_identity_reshapes(gm: fx.GraphModule, layout: ModelLayout) -> None:
    """Replace reshapes whose output shape equals their input shape by their input.

    Such views (GPT-2 ends with ``view(x, [-1, seq, d])``) tie a token-wise component to the sequence
    length; without them the unembedding can run on just the positions a metric reads.
    """
    reshapes = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in reshapes or node in layout.outputs:
            continue
        source = node.args[0]
        before, after = layout.values.get(source), layout.values.get(node)
        if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.shape == after.shape:
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
    gm.recompile()


def _other_shape(example: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Other sizes than the example's in the dynamic dimensions ``dims``, to check the split does not hard-code them."""
    batch, seq = example.shape
    other_batch = batch + 1 if 0 in dims else batch
    other_seq = (seq - 1 if seq > 2 else seq + 1) if 1 in dims else seq
    return example.repeat(2, 2)[:other_batch, :other_seq]


def _check_equivalent(original: fx.GraphModule, split: nn.Module, example: torch.Tensor) -> None:
    with torch.no_grad():
        expected = original(example)
        try:
            got = split(example)
        # Any exception: the split graph runs the model's own operations, and whatever fails is this error, with why.
        except Exception as error:
            raise UnsupportedArchitectureError(f"the per-head model fails to run: {error}") from error
    expected_flat, _ = torch.utils._pytree.tree_flatten(expected)
    got_flat = list(got) if isinstance(got, tuple) else [got]
    for i, (want, have) in enumerate(zip(expected_flat, got_flat, strict=True)):
        scale = want.abs().max().clamp_min(1e-6)
        if want.shape != have.shape or not torch.allclose(have, want, rtol=1e-4, atol=1e-4 * float(scale)):
            diff = (
                (have - want).abs().max().item()
                if want.shape == have.shape
                else f"shape {tuple(have.shape)} vs {tuple(want.shape)}"
            )
            what = "logits" if len(expected_flat) == 1 else f"output {i}"
            raise UnsupportedArchitectureError(
                f"the per-head model does not reproduce the original {what} (max difference {diff}); "
                "the residual stream or a norm is not of a form the pass understands"
            )


def _with_own_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s weights but with its own copy of the graph, so the pass leaves ``gm`` as it was."""
    with warnings.catch_warnings():  # torch's own pytree specs warn about themselves when copied
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        own = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    own.meta.update(gm.meta)
    return own


def split_heads(gm: fx.GraphModule, example_inputs: ExampleInputs | None = None) -> fx.GraphModule:
    """Split every attention block of a traced causal LM (see :func:`pahq_fx.passes.trace`) into per-head subgraphs.

    Returns a GraphModule computing the same outputs, whose ``meta["head_graph"]`` is the
    :class:`~pahq_fx.ir.head_graph.HeadGraph` description (layers, heads, key/value groups, MLPs, names). ``gm`` is
    left as it was: the pass rewrites a copy of its graph (sharing its weights).
    """
    check_float32_weights(gm.parameters())
    example = input_ids_from(example_inputs) if example_inputs is not None else graph_meta.example_input_ids(gm)
    gm = _with_own_graph(gm)
    layout = analyse(gm, example)
    _drop_identity_reshapes(gm, layout)
    contribution_names = _contribution_names(layout)
    builder = _Builder(gm, layout)
    output_plan, core_extras, unembed_extras = _place_outputs(layout, builder, contribution_names)
    blocks: dict[str, nn.Module] = {}
    steps: list[Step] = []
    components = [(s.contribution, s) for s in layout.sites] + [(m.contribution, m) for m in layout.mlps]
    components += [(s.output_norm, s) for s in layout.sites if s.output_norm is not None]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for contribution, site in sorted(components, key=lambda c: order[c[0]]):
        name = contribution_names[contribution]
        block: nn.Module
        if isinstance(site, AttentionSite) and contribution is site.contribution:
            block, aux = builder.attention(site, core_extras[site.layer])
            kind, read = StepKind.ATTENTION, site.read
        else:
            # A whole component reads the residual stream; a post-attention norm reads its block's output (the heads' sum).
            kind, read = (StepKind.MLP, site.read) if isinstance(site, MLPSite) else (StepKind.OUTPUT_NORM, site.contribution)
            prefix = "MLP" if kind is StepKind.MLP else "OutputNorm"
            component, aux = builder.component(
                builder.between([read], contribution), [read], contribution, f"{prefix}_{names.identifier(name)}"
            )
            block = component if layout.values[contribution].shape == layout.values[read].shape else StreamShaped(component)
        step = Step(kind, name, tuple(contribution_names[l] for l in layout.leaves[read]), aux)
        blocks[step.module] = block
        steps.append(step)
    unembed_nodes = builder.between([layout.final_read], layout.logits).union(
        *(builder.between([layout.final_read], e) for e in unembed_extras)
    )
    unembed, final_aux = builder.component(unembed_nodes, [layout.final_read], [layout.logits, *unembed_extras], "Unembed")
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    outputs = [layout.embed, *builder.aux]
    prelude, _ = extract(gm, ancestors(outputs) | set(outputs), [placeholder], outputs, "Prelude", always_tuple=True)
    final_reads = tuple(contribution_names[l] for l in layout.leaves[layout.final_read])
    model = PerHeadModel(prelude, len(builder.aux), blocks, steps, unembed, final_reads, final_aux, output_plan).to(
        example.device
    )
    _check_equivalent(gm, model, example)
    if graph_meta.dynamic_dims(gm):
        _check_equivalent(gm, model, _other_shape(example, graph_meta.dynamic_dims(gm)))
    model.requires_grad_(False)
    graph = _LeafTracer().trace(model)
    for node in graph.nodes:
        if isinstance(node.type, str):  # a postponed annotation: as a string in the code's globals it cannot be pickled
            node.type = None
    result = fx.GraphModule(model, graph, class_name="PerHeadGraph")
    result.meta[graph_meta.HEAD_GRAPH] = _head_graph(layout, steps, final_reads)
    result.meta[graph_meta.STRUCTURE] = Structure(tuple(steps), final_reads, final_aux)
    result.meta[graph_meta.EXAMPLE_INPUT_IDS] = example
    result.meta[graph_meta.DYNAMIC_DIMS] = graph_meta.dynamic_dims(gm)
    return result


def _head_graph(layout: ModelLayout, steps: list[Step], final_reads: tuple[str, ...]) -> HeadGraph:
    reads = {s.name: s.reads for s in steps}

    def components_after(layer: int) -> tuple[Component, ...]:
        after = sorted((m for m in layout.mlps if m.layer == layer), key=lambda m: m.position)
        component_names = [names.mlp(layer, m.position) for m in after]
        return tuple(Component(name, reads[name]) for name in component_names)

    layers = tuple(
        LayerInfo(
            index=site.layer,
            n_heads=site.n_heads,
            n_kv_groups=site.n_kv_groups,
            kv_group_of_head=site.kv_group_of_head,
            attention_reads=reads[names.attention(site.layer)],
            components=components_after(site.layer),
            has_output_norm=site.output_norm is not None,
            coupled_roles=site.coupled_roles,
        )
        for site in layout.sites
    )
    d_model = int(layout.values[layout.embed].shape[-1])
    return HeadGraph(layers=layers, final_reads=final_reads, d_model=d_model, leading=components_after(-1))
