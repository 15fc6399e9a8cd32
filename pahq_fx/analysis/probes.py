"""Head layouts by NaN probes: which (role, head) each projection feature feeds, which head each output-projection
input comes from. Pushing NaNs through the ops in between (reshapes, rotary embeddings, grouped-query repeats)
means no layout is written per model family; infinities find the layout under a norm over all heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ..errors import UnsupportedArchitectureError
from ..ir.graph_utils import ancestors, descendants, extract
from ..ir.names import Role
from .graph_facts import GraphFacts
from .layout import AttentionCall


@dataclass(frozen=True)
class RoleLayout:
    """Which projection features are each head's query, key and value, the key/value group of every query head,
    and the roles normalised across heads (a change of one head's input there reaches every head of the layer)."""

    features: dict[Role, list[list[int]]]
    group_of_head: tuple[int, ...]
    coupled: frozenset[Role] = frozenset()


class HeadProbe:
    """Runs pieces of the graph on probes whose one feature or head is NaN, and reads where the NaN lands."""

    def __init__(self, facts: GraphFacts) -> None:
        self.facts = facts

    def _probe(self, sub: fx.GraphModule, extra: list[fx.Node], inputs: list[torch.Tensor]) -> Any:
        with torch.no_grad():
            return sub(*inputs, *[self.facts.values[e] for e in extra])

    def _probe_output(
        self, sub: fx.GraphModule, extra: list[fx.Node], clean: list[torch.Tensor], i: int, probe: torch.Tensor
    ) -> Any:
        """``sub`` on the clean projection outputs with output ``i`` replaced by ``probe``."""
        return self._probe(sub, extra, [probe if j == i else t for j, t in enumerate(clean)])

    def role_features(
        self, attention: AttentionCall, outputs: list[fx.Node], gate_target: tuple[fx.Node, list[list[int]]] | None = None
    ) -> RoleLayout:
        """Assign every projection output feature to (role, head) with NaN probes.

        Where the ops between projections and attention act position by position (checked), one probe tests one
        feature per position at once, so a layer costs about ``width / positions`` runs instead of ``width``.

        A norm over all heads' queries or keys (OLMo 2) spreads a NaN to every head through its statistic. Then
        the probes are repeated with +inf, which such a norm keeps in place (the statistic becomes inf, every other
        feature is scaled to 0, the probed one becomes NaN); if they give a clean layout, it is used and the roles
        whose NaNs spread are *coupled*: a change of one head's input there changes every head of the layer.

        ``gate_target``: the output projection's input and its features per head, where projections gate the
        attention output (AFMoE): a feature that reaches no attention input but one head's output features is part
        of that head's query projection (it is computed from the same input, per head)."""
        args = attention.inputs + ([gate_target[0]] if gate_target else [])
        body = (ancestors(args) | set(args)) & (descendants(outputs) | set(outputs))
        sub, extra = extract(self.facts.gm, body, outputs, args, "ProbeProjectionToAttention")
        n_heads, k_heads = self.facts.values[args[0]].shape[1], self.facts.values[args[1]].shape[1]
        owner = {} if gate_target is None else {f: h for h, fs in enumerate(gate_target[1]) for f in fs}
        hits = self._hits(attention, outputs, sub, extra, float("nan"), owner)
        try:
            return RoleLayout(*self._group(attention, hits, n_heads, k_heads))
        except UnsupportedArchitectureError as nan_error:
            kept = self._hits(attention, outputs, sub, extra, float("inf"), owner)
            try:
                features, group_of_head = self._group(attention, kept, n_heads, k_heads)
            except UnsupportedArchitectureError:
                raise nan_error from None
            coupled = frozenset(role for role in Role if hits[role] != kept[role])
            if not coupled:
                raise nan_error from None
            return RoleLayout(features, group_of_head, coupled)

    def _hits(
        self,
        attention: AttentionCall,
        outputs: list[fx.Node],
        sub: fx.GraphModule,
        extra: list[fx.Node],
        poison: float,
        gate_owner: dict[int, int],
    ) -> dict[Role, dict[int, set[int]]]:
        """For every projection feature, its role and the heads a ``poison`` value there reaches (``gate_owner``:
        the head of every output-projection input feature, where gates are probed)."""
        args = attention.inputs
        clean = [self.facts.values[o].detach().clone() for o in outputs]
        hits: dict[Role, dict[int, set[int]]] = {r: {} for r in Role}
        offset = 0
        for i, y in enumerate(clean):
            width = y.shape[-1]
            positions = y.numel() // width
            per_position = self._per_position(sub, extra, clean, i, [self.facts.values[a] for a in args])
            per_probe = positions if per_position else 1  # features one probe tests
            for first in range(0, width, per_probe):
                features = list(range(first, min(first + per_probe, width)))
                probe = y.clone()
                if per_position:
                    probe.view(positions, width)[torch.arange(len(features)), torch.tensor(features)] = poison
                else:
                    probe[..., first] = poison
                reached = self._reached(sub, extra, clean, i, probe, per_position, gate_owner, len(features))
                for p, f in enumerate(features):
                    touched = [
                        (role, {h for h, hit in enumerate(r[p]) if hit})
                        for role, r in zip(Role, reached, strict=False)  # past the roles: a gate's heads (below)
                        if any(r[p])
                    ]
                    if not touched and len(reached) > len(Role) and sum(reached[-1][p]) == 1:  # a gate of one head
                        touched = [(Role.QUERY, {reached[-1][p].index(True)})]
                    if len(touched) != 1:
                        where = ", ".join(r.value for r, _ in touched) or "no attention input"
                        raise UnsupportedArchitectureError(
                            f"attention call {attention.name}: projection feature {f} of {outputs[i].name} reaches {where}; "
                            "each feature must feed exactly one of query, key, value"
                        )
                    role, heads = touched[0]
                    hits[role][offset + f] = heads
            offset += width
        return hits

    def _reached(
        self,
        sub: fx.GraphModule,
        extra: list[fx.Node],
        clean: list[torch.Tensor],
        i: int,
        probe: torch.Tensor,
        per_position: bool,
        gate_owner: dict[int, int],
        probed: int,
    ) -> list[list[list[bool]]]:
        """For each attention input (and the output projection's input, where gates are probed), which heads the
        probe reaches (a value that is not finite): per position for the ``probed`` positions that carry a probed
        feature ([probed][heads]; reading every position into Python cost a quarter of a split traced at a whole
        task's shape) or, for a single probed feature, over all positions ([1][heads])."""
        results = self._probe_output(sub, extra, clean, i, probe)
        reached = []
        for r in results[: len(Role)]:
            poisoned = (~torch.isfinite(r)).any(-1)  # [batch, heads, seq]
            reached.append(
                (
                    poisoned.permute(0, 2, 1).flatten(0, 1)[:probed] if per_position else poisoned.any(-1).any(0, keepdim=True)
                ).tolist()
            )
        if len(results) > len(Role):  # the output projection's input, [batch, seq, features]: features to heads
            poisoned = (~torch.isfinite(results[-1])).flatten(0, -2)
            poisoned = poisoned[:probed] if per_position else poisoned.any(0, keepdim=True)
            heads = 1 + max(gate_owner.values())
            by_head = torch.zeros(poisoned.shape[0], heads, dtype=torch.bool)
            for f, h in gate_owner.items():
                by_head[:, h] |= poisoned[:, f]
            reached.append(by_head.tolist())
        return reached

    def _per_position(
        self, sub: fx.GraphModule, extra: list[fx.Node], clean: list[torch.Tensor], i: int, attention_inputs: list[torch.Tensor]
    ) -> bool:
        """Whether a NaN at one position of projection output ``i`` ([batch, seq, width] flattened row-major) reaches the
        attention inputs ([batch, heads, seq, dim]) at that same (batch, seq) position and nowhere else. Checked with
        probes that poison every position whose index has bit k equal to v, for every bit k and both values v: a
        NaN that moved to another position differs from it in some bit and shows up where it must not. An attention
        input with no NaN at all does not read output ``i`` (separate query, key and value projections).
        ``attention_inputs`` are the recorded values of the attention inputs: their shapes say whether to check."""
        positions = clean[i].numel() // clean[i].shape[-1]
        if any(r.dim() != 4 or r.shape[0] * r.shape[2] != positions for r in attention_inputs):
            return False
        index = torch.arange(positions, device=clean[i].device)
        for bit in range(max(1, (positions - 1).bit_length())):
            for value in (0, 1):
                poisoned = (index >> bit) & 1 == value
                if not poisoned.any():
                    continue
                probe = clean[i].clone()
                probe.view(positions, -1)[poisoned] = float("nan")
                for r in self._probe_output(sub, extra, clean, i, probe):
                    nan = torch.isnan(r).any(-1)  # [batch, heads, seq], or [batch, seq] for the output projection's input
                    nan = (nan.any(1) if nan.dim() == 3 else nan).flatten()  # [batch * seq], row-major like the probe
                    if nan.any() and not torch.equal(nan, poisoned):  # no NaN at all: this input does not read output i
                        return False
        return True

    def _group(
        self, attention: AttentionCall, hits: dict[Role, dict[int, set[int]]], n_heads: int, k_heads: int
    ) -> tuple[dict[Role, list[list[int]]], tuple[int, ...]]:
        query: list[list[int]] = [[] for _ in range(n_heads)]
        for f, heads in hits[Role.QUERY].items():
            if len(heads) != 1:
                raise UnsupportedArchitectureError(
                    f"attention call {attention.name}: query feature {f} mixes heads {sorted(heads)}: something between the "
                    "projection and the attention combines heads (a norm over all heads' queries, as in OLMo 2 and "
                    "OLMoE), so a head's query is not a function of its own input; not supported"
                )
            query[heads.pop()].append(f)
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
        # Query head h attends with key head h // (n_heads // k_heads): SDPA's own broadcast under enable_gqa, and
        # the identity without grouping; a key/value group is the set of key heads one key feature reaches.
        rep = n_heads // k_heads
        group_of_head = tuple(next(g for g, s in enumerate(key_sets) if h // rep in s) for h in range(n_heads))
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

    def z_features(self, attention: AttentionCall, z: fx.Node) -> tuple[list[list[int]], bool]:
        """Which output-projection input features come from each head, and whether a norm over all heads lies
        between attention and output projection (BitNet's sub-norm): found by infinity probes, as for query and key
        norms (:meth:`role_features`), and then every head's output depends on every head's inputs."""
        body = descendants([attention.output]) & (ancestors([z]) | {z})
        sub, extra = extract(self.facts.gm, body, [attention.output], [z], "ProbeAttentionToOutput")
        try:
            return self._z_owners(attention, z, sub, extra, float("nan")), False
        except UnsupportedArchitectureError as nan_error:
            try:
                return self._z_owners(attention, z, sub, extra, float("inf")), True
            except UnsupportedArchitectureError:
                raise nan_error from None

    def _z_owners(
        self, attention: AttentionCall, z: fx.Node, sub: fx.GraphModule, extra: list[fx.Node], poison: float
    ) -> list[list[int]]:
        clean = self.facts.values[attention.output]
        owner: dict[int, int] = {}
        for h in range(clean.shape[1]):
            probe = clean.clone()
            probe[:, h] = poison
            reached = (~torch.isfinite(self._probe(sub, extra, [probe]))).flatten(0, -2).any(0)
            for f in reached.nonzero().flatten().tolist():
                if f in owner:
                    raise UnsupportedArchitectureError(f"attention call {attention.name}: output feature {f} mixes heads")
                owner[f] = h
        width = self.facts.values[z].shape[-1]
        if sorted(owner) != list(range(width)):
            raise UnsupportedArchitectureError(
                f"attention call {attention.name}: some output-projection inputs come from no head"
            )
        return [[f for f in range(width) if owner[f] == h] for h in range(clean.shape[1])]
