"""Every causal-LM family of the installed ``transformers``, built tiny and put through the pass and ACDC.

    python scripts/family_sweep.py                 # every family (about 25 minutes on 2 CPU cores)
    python scripts/family_sweep.py llama gpt_oss   # some

For each family: build a 2-layer, 4-head model from the config class's defaults with small sizes (a hybrid whose
first two layers have no softmax attention: 3 layers, one of them attention; a hybrid whose schedule derives from a
period and offset, Jamba's, or from block types, RecurrentGemma's: a mixer layer, then attention), transform it
in FP32 and compare with the Hugging Face logits, then run ``discover`` (FP32) and the naive reference of the
tests (tests/acdc_reference.py) on a random task and compare the circuits. Prints a table and writes JSON
(``--out``). Outcomes:

- ``exact``: logits equal to round-off and the same circuit as the reference;
- ``MISMATCH``: the split or the circuit differs (a bug: the tests' families should catch it too);
- ``refused``: ``pahq_fx`` rejected the architecture with its own error, whose message is shown;
- ``ERROR``: ``pahq_fx`` failed with another exception (a bug: refusals must name the problem);
- ``timed out``: over ``--timeout`` seconds (families whose defaults keep many layers or heads);
- ``not built``: the tiny config or the Hugging Face model itself failed (multimodal, hybrid layer schedules,
  sizes tied to other fields); nothing about ``pahq_fx``.

Used to find families no issue names; the ones that matter are pinned in tests/test_families.py.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import warnings
from pathlib import Path

import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import pahq_fx
from pahq_fx.errors import PahqError

ROOT = Path(__file__).resolve().parent.parent
SIZES = dict(
    vocab_size=64,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    intermediate_size=64,
    ffn_dim=64,
    head_dim=8,
    max_position_embeddings=64,
    n_positions=64,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=16,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    rotary_dim=4,
    d_model=32,
    decoder_layers=2,
    decoder_attention_heads=4,
    decoder_ffn_dim=64,
    mamba_n_heads=4,
    mamba_d_head=16,
    mamba_d_state=4,
    mamba_n_groups=1,
    mamba_dt_rank=4,
    mamba_d_ssm=64,
    lru_width=32,
    attn_layer_indices=[1],
    attn_layer_period=2,
    attn_layer_offset=1,
    block_types=["recurrent", "attention"],
)
THRESHOLD = 1e-3
OUTCOMES = ("exact", "MISMATCH", "refused", "ERROR", "timed out", "not built")


class NotBuilt(Exception):
    """The tiny model could not be built or run by Hugging Face itself."""


def _set_size(config: transformers.PretrainedConfig, key: str, value: object) -> None:
    """Set a size the config has; derived ones (read-only properties, per-layer attributes) stay as it computes them."""
    try:
        if hasattr(config, key) or key in getattr(config, "attribute_map", {}):
            setattr(config, key, value)
    except Exception:
        pass


def _schedule(layer_types: list[str]) -> list[str]:
    """The first two layer types, or for a hybrid whose first two layers have no softmax attention (Qwen3-Next's
    three linear-attention layers before each full one) a mixer, an attention layer and a mixer again; the attention
    layer is ``full_attention`` where the default schedule has none (Granite 4's, all Mamba by default)."""
    first = layer_types[: SIZES["num_hidden_layers"]]
    softmax = [t for t in layer_types if ("attention" in t or t == "hybrid") and "linear" not in t]
    if any(t in softmax for t in first):
        return first
    other = next(t for t in layer_types if t not in softmax)
    return [other, softmax[0] if softmax else "full_attention", other]


def tiny_model(model_type: str) -> torch.nn.Module:
    try:
        config = CONFIG_MAPPING[model_type]()
        if hasattr(config, "text_config") or hasattr(config, "vision_config"):
            raise NotBuilt("multimodal config")
        for key, value in SIZES.items():
            _set_size(config, key, value)
        if getattr(config, "layer_types", None) is not None:
            _set_size(config, "layer_types", _schedule(list(config.layer_types)))
            _set_size(config, "num_hidden_layers", len(config.layer_types))
        torch.manual_seed(0)
        model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])(config).eval()
        with torch.no_grad():  # larger weights than the init's, as in the tests: effects well above round-off
            for parameter in model.parameters():
                if parameter.dim() >= 2:
                    parameter.mul_(3.0)
        model(input_ids=torch.ones(1, 3, dtype=torch.long), use_cache=False)
    except NotBuilt:
        raise
    except Exception as error:
        raise NotBuilt(f"{type(error).__name__}: {error}") from None
    return model


def check(model_type: str) -> dict:
    from tests.acdc_reference import ReferenceACDC

    try:
        model = tiny_model(model_type)
    except NotBuilt as why:
        return {"outcome": "not built", "detail": str(why)}
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            expected = model(input_ids=ids, use_cache=False).logits
        transformed = pahq_fx.transform(model, head=(0, 1), example_inputs=ids, precision="fp32", compile=False)
        error = (transformed(ids) - expected).abs().max().item()
        layer = transformed.head_graph.layers[0]
        shape = f"{layer.n_heads} heads, {layer.n_kv_groups} kv groups"
        if error > 1e-4:
            return {"outcome": "MISMATCH", "detail": f"split logits differ by {error:.2e} ({shape})"}
        generator = torch.Generator().manual_seed(2)
        task = pahq_fx.Task(torch.randint(1, 64, (4, 6), generator=generator), torch.randint(1, 64, (4, 6), generator=generator))
        reference, _ = ReferenceACDC(model, task.clean_input_ids, task.corrupted_input_ids, task.metric_mask).run(THRESHOLD)
        circuit = pahq_fx.discover(
            model, task, threshold=THRESHOLD, precision="fp32", progress=False, compile=False, allow_weak_task=True
        )
    except PahqError as refusal:
        return {"outcome": "refused", "detail": f"{type(refusal).__name__}: {refusal}"}
    except TimeoutError:
        raise
    except Exception as error:
        return {"outcome": "ERROR", "detail": f"{type(error).__name__}: {error}"}
    same = circuit.edge_set() == reference
    detail = f"split error {error:.1e}, {shape}, {len(reference)} reference edges"
    return {"outcome": "exact" if same else "MISMATCH", "detail": detail + ("" if same else ", circuits differ")}


def _timeout(signum, frame):
    raise TimeoutError("over the time limit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", help="model types (default: every causal-LM family)")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per family")
    parser.add_argument("--out", default="family_sweep.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    signal.signal(signal.SIGALRM, _timeout)
    results = {}
    for model_type in args.families or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        signal.alarm(args.timeout)
        try:
            results[model_type] = check(model_type)
        except TimeoutError:
            results[model_type] = {"outcome": "timed out", "detail": f"over {args.timeout} s (raise --timeout)"}
        finally:
            signal.alarm(0)
        print(f"| {model_type} | {results[model_type]['outcome']} | {results[model_type]['detail'][:160]} |", flush=True)
    counts = {o: sum(r["outcome"] == o for r in results.values()) for o in OUTCOMES}
    print(", ".join(f"{n} {o}" for o, n in counts.items()), f"(transformers {transformers.__version__})")
    Path(args.out).write_text(
        json.dumps(
            {"transformers": transformers.__version__, "torch": torch.__version__, "counts": counts, "results": results}, indent=1
        )
    )


if __name__ == "__main__":
    main()
