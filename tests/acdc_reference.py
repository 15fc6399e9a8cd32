"""A deliberately simple ACDC, written from docs/acdc.md without the library's runtime or edge graph.

Full forward per query from the embedding (no start-at-layer, no cached clean activations, no masks as
tensors, no incremental state, no compile): every receiver's input is rebuilt by hand, sender by sender, as
the sum of the kept senders' current outputs and the removed senders' corrupted outputs plus the output
biases. The per-head blocks come from the split pass, which the split tests check against the Hugging Face
model. ``dense`` is the from-scratch evaluation the runtime's state must equal: the same formula with a
start step (earlier steps clean) and a precision plan, run through the lowered blocks' own forward.
"""

from __future__ import annotations

import torch

from pahq_fx.ir.names import Role
from pahq_fx.ir.structure import StepKind
from pahq_fx.passes import lower_precision, split_heads, trace
from pahq_fx.passes.precision import FullPrecisionUnits, all_heads_fp32, set_plan


def _is_attention(contribution):
    """``a{L}``, an attention layer's heads (not its post-attention norm ``a{L}.out``)."""
    return contribution.startswith("a") and contribution[1:].isdigit()


def _layer_of(contribution):
    """The attention layer a contribution belongs to or follows: ``a3``, ``a3.out``, ``m3``, ``m3.1`` -> 3; ``m-1`` -> -1."""
    return int(contribution[1:].split(".")[0])


class ReferenceACDC:
    def __init__(self, model, clean, corrupted, mask, precision="fp32"):
        traced = trace(model, clean[:2], dynamic_shapes="batch")  # every prompt has the task's length
        if not traced.meta["dynamic_dims"] and clean.shape[0] > 2:  # static shapes: a trace at the task's own shape
            traced = trace(model, clean, dynamic_shapes=False)
        self.gm = lower_precision(split_heads(traced), precision)
        self.hg = self.gm.meta["head_graph"]
        self.structure = self.gm.meta["structure"]
        self.mask = mask
        self.clean = clean
        with all_heads_fp32(self.gm):
            self.clean_outputs = self.forward(clean, removed=set(), corrupt=None)[0]
            self.corrupt_outputs = self.forward(corrupted, removed=set(), corrupt=None)[0]
            logits = self.forward(clean, removed=set(), corrupt=None)[1]
        self.clean_logprobs = torch.log_softmax(logits[mask], -1)

    def dense(self, removed, start, plan):
        """(KL, every sender's output) with ``removed`` edges patched, steps before ``start`` clean and FP32, and
        ``plan`` ({layer: FullPrecisionUnits}) choosing the FP32 units of the steps that run."""
        set_plan(self.gm, lambda block: plan.get(block.layer, FullPrecisionUnits()))
        try:
            outputs, logits = self.forward(self.clean, removed, self.corrupt_outputs, start=start)
        finally:
            set_plan(self.gm, lambda block: FullPrecisionUnits())
        return self._kl(logits), outputs

    def components(self, name):
        """The senders a contribution sums: an attention layer's heads; any other contribution is one sender."""
        if _is_attention(name):
            layer = self.hg.layers[int(name[1:])]
            return [layer.head_name(h) for h in range(layer.n_heads)]
        return [name]

    def senders_of(self, reads):
        # docs/acdc.md's sender order (per layer its heads, its post-attention norm, its whole components), whatever
        # order the graph computes them in (Falcon-H1 runs its Mamba mixer before the heads beside it).
        order = self.hg.senders()
        upstream = {s for c in reads for s in self.components(c)}
        return [s for s in reversed(order) if s in upstream]

    def receiver_input(self, receiver, reads, outputs, removed, corrupt):
        total = 0
        for component in reads:
            if _is_attention(component):
                bias = getattr(self.gm, component).o_bias
                total = total + (0 if bias is None else bias)
            for sender in self.components(component):
                use_corrupt = (sender, receiver) in removed
                total = total + (corrupt[sender] if use_corrupt else outputs[sender])
        return total

    @torch.no_grad()
    def forward(self, ids, removed, corrupt, start=0):
        out = self.gm.prelude(ids)
        aux = out[1:]
        outputs = {"embed": out[0]}
        for k, step in enumerate(self.structure.steps):
            block = getattr(self.gm, step.module)
            args = [aux[i] for i in step.aux]
            if k < start:
                outputs.update({name: self.clean_outputs[name] for name in self.components(step.name)})
            elif step.kind is StepKind.ATTENTION:
                layer = self.hg.layers[block.layer]
                q = [
                    self.receiver_input(layer.query_name(h), step.reads, outputs, removed, corrupt) for h in range(layer.n_heads)
                ]
                k = [
                    self.receiver_input(layer.kv_name(g, Role.KEY), step.reads, outputs, removed, corrupt)
                    for g in range(layer.n_kv_groups)
                ]
                v = [
                    self.receiver_input(layer.kv_name(g, Role.VALUE), step.reads, outputs, removed, corrupt)
                    for g in range(layer.n_kv_groups)
                ]
                heads = block(torch.stack(q, 2), torch.stack(k, 2), torch.stack(v, 2), *args)
                for h in range(layer.n_heads):
                    outputs[layer.head_name(h)] = heads[:, :, h]
            else:
                x = self.receiver_input(step.name, step.reads, outputs, removed, corrupt)
                outputs[step.name] = block(x, *args)
        final = self.receiver_input("resid_post", self.structure.final_reads, outputs, removed, corrupt)
        logits = self.gm.unembed(final, *[aux[i] for i in self.structure.final_aux])
        return outputs, logits

    def kl(self, removed):
        return self._kl(self.forward(self.clean, removed, self.corrupt_outputs)[1])

    def _kl(self, logits):
        logprobs = torch.log_softmax(logits[self.mask], -1)
        return float((self.clean_logprobs.exp() * (self.clean_logprobs - logprobs)).sum(-1).mean())

    def receivers(self):
        """(receiver, its senders nearest first, the nodes whose outputs it feeds), output backwards."""
        out = [("resid_post", self.senders_of(self.structure.final_reads), [])]
        # From the output backwards, layer by layer; within a layer its whole components and norm (last first), then
        # its heads' inputs, whatever order a parallel block computes them in.
        order = sorted(
            enumerate(self.structure.steps), key=lambda p: (-_layer_of(p[1].name), p[1].kind is StepKind.ATTENTION, -p[0])
        )
        for _, step in order:
            if step.kind is not StepKind.ATTENTION:  # an MLP, a hybrid's mixer, a post-attention norm
                out.append((step.name, self.senders_of(step.reads), [step.name]))
                continue
            layer = self.hg.layers[int(step.name[1:])]
            senders = self.senders_of(step.reads)
            every_head = [layer.head_name(h) for h in range(layer.n_heads)]
            for role in (Role.VALUE, Role.KEY):
                for g in reversed(range(layer.n_kv_groups)):
                    heads = [layer.head_name(h) for h in range(layer.n_heads) if layer.kv_group_of_head[h] == g]
                    out.append((layer.kv_name(g, role), senders, every_head if role in layer.coupled_roles else heads))
            for h in reversed(range(layer.n_heads)):
                out.append(
                    (layer.query_name(h), senders, every_head if Role.QUERY in layer.coupled_roles else [layer.head_name(h)])
                )
        return out

    def run(self, threshold):
        """Returns the kept edge set and every tested effect."""
        receivers = self.receivers()
        all_edges = {(s, r) for r, senders, _ in receivers for s in senders}
        removed: set[tuple[str, str]] = set()
        effects = {}
        for receiver, senders, nodes in receivers:
            has_output = any((node, r) in all_edges - removed for node in nodes for r, _, _ in receivers)
            if nodes and not has_output:
                removed |= {(s, receiver) for s in senders}
                continue
            baseline = self.kl(removed)
            for sender in senders:
                trial = removed | {(sender, receiver)}
                value = self.kl(trial)
                effects[(sender, receiver)] = value - baseline
                if value - baseline < threshold:
                    removed, baseline = trial, value
        return all_edges - removed, effects
