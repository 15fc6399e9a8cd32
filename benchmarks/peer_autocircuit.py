"""auto-circuit's ACDC on the same weights and task, run inside the peer's own virtual environment.

Not a test and not a dependency: ``benchmarks/peer/setup.sh`` builds the environment (auto-circuit 1.0.1 needs
transformer-lens 2.x, transformers 4.x and NumPy < 2), and ``benchmarks/acdc.py --peer auto-circuit`` calls this
script by subprocess with the peer's python. It writes the circuit in pahq_fx's canonical names with the run's
wall time, search time, queries (every edge is tested: auto-circuit does not prune nodes without outgoing edges),
one eager forward of the Hugging Face model on the clean batch (the unit of forward-equivalents) and peak memory.

How it is run, so the comparison is fair: the Hugging Face GPT-2 checkpoint is converted to a HookedTransformer
without folding or centring (activations stay the HF model's; the conversion is checked on the logits); the
factorized graph with separate q/k/v inputs; resample ablation from the corrupted prompts; one threshold
(``tao_bases=[t], tao_exps=[0]``); the whole task in one batch (it reads only the first); the output slice set to
the task's metric positions; and the edges in pahq_fx's canonical order within each layer (auto-circuit otherwise
takes them in set-iteration order). Known differences, reported, not hidden: it starts each receiver from the
current state's metric without re-measuring it (equal to ours in FP32) and tests every edge.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

PEER_NAMES = {"Resid Start": "embed", "Resid End": "resid_post"}


def canonical(name: str) -> str:
    """auto-circuit node names -> pahq_fx's: ``A1.2`` -> ``a1.h2``, ``A1.2.Q`` -> ``a1.h2.q``, ``MLP 1`` -> ``m1``."""
    if name in PEER_NAMES:
        return PEER_NAMES[name]
    if name.startswith("MLP "):
        return f"m{name.split()[1]}"
    parts = name[1:].split(".")
    head = f"a{parts[0]}.h{parts[1]}"
    return head if len(parts) == 2 else f"{head}.{parts[2].lower()}"


def hooked_gpt2(checkpoint: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(checkpoint).float().eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_heads=c.n_head,
        d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        d_vocab=c.vocab_size,
        n_ctx=c.n_positions,
        act_fn=c.activation_function,
        normalization_type="LN",
        eps=c.layer_norm_epsilon,
        positional_embedding_type="standard",
        default_prepend_bos=False,
    )
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.eval()
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    return hf, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="Hugging Face GPT-2 checkpoint directory")
    parser.add_argument("--task", required=True, help="task saved by pahq_fx.Task.save (safetensors)")
    parser.add_argument("--threshold", type=float, required=True)
    parser.add_argument("--edge-order", required=True, help="JSON list of [sender, receiver] in pahq_fx's order")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.prune_algos.ACDC import acdc_prune_scores
    from auto_circuit.utils.graph_utils import patchable_model
    from safetensors.torch import load_file

    torch.manual_seed(0)
    start = time.perf_counter()
    task = load_file(args.task)
    clean, corrupt, mask = task["clean_input_ids"], task["corrupted_input_ids"], task["metric_mask"]
    hf, model = hooked_gpt2(args.checkpoint)
    with torch.no_grad():
        hf_logits = hf(clean).logits
        torch.testing.assert_close(model(clean), hf_logits, rtol=1e-4, atol=1e-4)
    forwards = []
    with torch.no_grad():
        for _ in range(6):
            t0 = time.perf_counter()
            hf(clean, use_cache=False)
            forwards.append(time.perf_counter() - t0)
    columns = mask.any(0).nonzero().flatten()
    first, last = int(columns[0]), int(columns[-1])
    if not bool(mask[:, first : last + 1].all()) or bool(mask.sum() != mask.shape[0] * (last - first + 1)):
        raise SystemExit("the peer reads one contiguous block of positions; this task's metric positions are not one")
    answers = [torch.tensor([0])] * clean.shape[0]
    loader = PromptDataLoader(
        PromptDataset(clean, corrupt, answers, answers), seq_len=None, diverge_idx=0, batch_size=clean.shape[0], shuffle=False
    )
    patchable = patchable_model(model, factorized=True, slice_output=None, separate_qkv=True, device=torch.device("cpu"))
    patchable.out_slice = (slice(None), slice(first, last + 1))
    by_name = {(canonical(e.src.name), canonical(e.dest.name)): e for e in patchable.edges}
    order = [tuple(pair) for pair in json.loads(Path(args.edge_order).read_text())]
    if set(order) != set(by_name):
        missing, extra = set(order) - set(by_name), set(by_name) - set(order)
        raise SystemExit(f"edge sets differ: ours only {sorted(missing)[:5]}, peer only {sorted(extra)[:5]}")
    patchable.edges = [by_name[pair] for pair in order]  # ACDC sorts by layer, stably: our order within a layer
    setup_s = time.perf_counter() - start
    search_start = time.perf_counter()
    scores = acdc_prune_scores(patchable, loader, None, tao_exps=[0], tao_bases=[args.threshold])
    search_s = time.perf_counter() - search_start
    kept = [pair for pair, e in by_name.items() if torch.isinf(e.prune_score(scores))]
    result = {
        "peer": "auto-circuit 1.0.1",
        "edges": sorted(kept),
        "queries": len(order),
        "setup_s": setup_s,
        "search_s": search_s,
        "wall_s": time.perf_counter() - start,
        "forward_s": statistics.median(forwards[1:]),
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
