"""The canonical names: every name the graphs build parses back to what built it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pahq_fx.acdc import EdgeGraph, ReceiverKind
from pahq_fx.ir import names
from pahq_fx.ir.head_graph import Component, HeadGraph, LayerInfo
from pahq_fx.ir.names import NodeKind, Role


@given(layer=st.integers(0, 200), index=st.integers(0, 200), role=st.sampled_from(list(Role)))
def test_built_names_parse_back(layer, index, role):
    head = names.parse(names.head(layer, index))
    assert (head.kind, head.layer, head.index, head.role) == (NodeKind.HEAD, layer, index, None)
    query = names.parse(names.attention_input(names.head(layer, index), role))
    assert (query.kind, query.layer, query.index, query.role) == (NodeKind.HEAD, layer, index, role)
    assert names.node_of(names.attention_input(names.head(layer, index), role)) == names.head(layer, index)
    if role is not Role.QUERY:
        group = names.parse(names.attention_input(names.kv_group(layer, index), role))
        assert (group.kind, group.index, group.role, group.node) == (NodeKind.KV_GROUP, index, role, names.kv_group(layer, index))
    assert names.parse(names.mlp(layer)) == names.Name(NodeKind.MLP, layer)
    for position in (1, index + 1):  # later components after the layer (a hybrid's mixers and MLPs), and before layer 0
        for after in (layer, -1):
            component = names.parse(names.mlp(after, position))
            assert (component.kind, component.layer, component.index, component.node) == (
                NodeKind.MLP,
                after,
                position,
                names.mlp(after, position),
            )
    norm = names.parse(names.attention_output(layer))
    assert (norm, norm.node) == (names.Name(NodeKind.ATTENTION_OUTPUT, layer), names.attention_output(layer))


@given(
    n_layers=st.integers(1, 4),
    heads_and_groups=st.sampled_from([(1, 1), (4, 4), (4, 2), (8, 1), (6, 3)]),
    output_norm=st.booleans(),
    components=st.lists(st.integers(0, 3), min_size=5, max_size=5),
)
def test_every_sender_and_receiver_of_a_graph_parses(n_layers, heads_and_groups, output_norm, components):
    """Any layout, hybrids included (several whole components after a layer, and before the first)."""
    n_heads, n_groups = heads_and_groups
    attention = names.attention_output if output_norm else names.attention

    def after(layer, count, stream):
        return tuple(Component(names.mlp(layer, k), stream + tuple(names.mlp(layer, j) for j in range(k))) for k in range(count))

    leading = after(-1, components[-1], (names.EMBED,))
    layers = tuple(
        LayerInfo(
            l,
            n_heads,
            n_groups,
            tuple(h * n_groups // n_heads for h in range(n_heads)),
            (names.EMBED,),
            after(l, components[l], (names.EMBED, attention(l))),
            has_output_norm=output_norm,
        )
        for l in range(n_layers)
    )
    graph = EdgeGraph(HeadGraph(layers, (names.EMBED,), 16, leading))
    for receiver in graph.receivers:
        parsed = names.parse(receiver.name)
        assert parsed.role is receiver.role and parsed.layer == receiver.layer
        if receiver.is_attention_input:
            expected = NodeKind.KV_GROUP if n_groups != n_heads and receiver.role is not Role.QUERY else NodeKind.HEAD
            assert parsed.kind is expected and parsed.index == receiver.unit
        else:
            assert (
                parsed.kind
                is {
                    ReceiverKind.MLP: NodeKind.MLP,
                    ReceiverKind.OUTPUT_NORM: NodeKind.ATTENTION_OUTPUT,
                    ReceiverKind.RESID_POST: NodeKind.RESID_POST,
                }[receiver.kind]
            )
    for sender in graph.senders:
        assert names.parse(sender.name).node == sender.name
    components_sent = [s.name for s in graph.senders if names.parse(s.name).kind is NodeKind.MLP]
    assert len(components_sent) == len(set(components_sent)) == sum(components[:n_layers]) + components[-1]
    # a component's receiver comes before (in the output-backwards order) every receiver it can send to
    for sender in components_sent:
        first_reader = min((i for i, r in enumerate(graph.receivers) if graph.sender_index[sender] in r.senders), default=None)
        assert first_reader is None or first_reader < graph.receiver_index[sender]
    if output_norm:  # heads send only to their layer's norm, which sends on
        norm = graph.receivers[graph.receiver_index[names.attention_output(0)]]
        assert [graph.senders[s].name for s in norm.senders] == [names.head(0, h) for h in reversed(range(n_heads))]
        heads = {graph.sender_index[names.head(l, h)] for l in range(n_layers) for h in range(n_heads)}
        assert all(r.kind is ReceiverKind.OUTPUT_NORM for r in graph.receivers if heads & set(r.senders))


@pytest.mark.parametrize(
    "bad",
    [
        "a1",
        "a1.out.q",
        "a.out",
        "a1.h2.x",
        "a1.g0.q",
        "a1.g",
        "m",
        "resid",
        "a1.h2.q.k",
        "A1.h2",
        "m-2",
        "m0.0",
        "m1.02",
        "m1.q",
        "m-1.h0",
    ],
)
def test_other_strings_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"canonical node name|no query input"):
        names.parse(bad)
