"""The canonical names: every name the graphs build parses back to what built it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pahq_fx import names
from pahq_fx.acdc import EdgeGraph
from pahq_fx.head_graph import HeadGraph, LayerInfo
from pahq_fx.names import NodeKind, Role


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


@given(n_layers=st.integers(1, 4), heads_and_groups=st.sampled_from([(1, 1), (4, 4), (4, 2), (8, 1), (6, 3)]))
def test_every_sender_and_receiver_of_a_graph_parses(n_layers, heads_and_groups):
    n_heads, n_groups = heads_and_groups
    layers = tuple(
        LayerInfo(l, n_heads, n_groups, tuple(h * n_groups // n_heads for h in range(n_heads)), True,
                  (names.EMBED,), (names.EMBED, names.attention(l)))
        for l in range(n_layers)
    )
    graph = EdgeGraph(HeadGraph(layers, (names.EMBED,), 16))
    for receiver in graph.receivers:
        parsed = names.parse(receiver.name)
        assert parsed.role is receiver.role and parsed.layer == receiver.layer
        if receiver.is_attention_input:
            expected = NodeKind.KV_GROUP if n_groups != n_heads and receiver.role is not Role.QUERY else NodeKind.HEAD
            assert parsed.kind is expected and parsed.index == receiver.unit
    for sender in graph.senders:
        assert names.parse(sender.name).node == sender.name


@pytest.mark.parametrize("bad", ["a1", "a1.h2.x", "a1.g0.q", "a1.g", "m", "resid", "a1.h2.q.k", "A1.h2"])
def test_other_strings_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="canonical node name|no query input"):
        names.parse(bad)
