"""Train the small models shipped in pahq_fx/zoo/models, reproducibly (fixed seeds, CPU, minutes each).

    python scripts/train_zoo.py            # all models
    python scripts/train_zoo.py gpt2-induction

Training prompts come from the task generators with seeds >= 10_000; the accuracies written to each model's
zoo.json (and checked by tests/test_zoo.py on fresh samples) use seeds below that.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from pahq_fx.tasks import build_tokenizer, make_task
from pahq_fx.zoo import ZOO_DIR, task_accuracy

TRAIN_SEED_BASE = 10_000


@dataclass(frozen=True)
class Recipe:
    name: str
    architecture: str
    tasks: tuple[str, ...]
    layers: int
    heads: int
    kv_heads: int
    d_model: int
    steps: int
    lr: float = 3e-3
    batch: int = 64
    positions: int = 32
    task_options: tuple[tuple[str, int], ...] = ()


RECIPES = {
    "gpt2-induction": Recipe("gpt2-induction", "gpt2", ("induction",), layers=2, heads=4, kv_heads=4, d_model=64, steps=1500),
    "llama-ioi": Recipe("llama-ioi", "llama", ("ioi",), layers=2, heads=4, kv_heads=2, d_model=64, steps=2500),
    "gpt2-greater-than": Recipe(
        "gpt2-greater-than", "gpt2", ("greater_than", "docstring"), layers=2, heads=4, kv_heads=4, d_model=64, steps=2500
    ),
    # The shape of docs/runtime.md's measurements: 8 heads, d_model 128, 64-token induction prompts.
    "gpt2-induction-8h": Recipe(
        "gpt2-induction-8h",
        "gpt2",
        ("induction",),
        layers=2,
        heads=8,
        kv_heads=8,
        d_model=128,
        steps=2500,
        positions=64,
        task_options=(("half", 32),),
    ),
}


def build_model(recipe: Recipe, vocab_size: int) -> torch.nn.Module:
    if recipe.architecture == "gpt2":
        config = GPT2Config(
            n_layer=recipe.layers,
            n_head=recipe.heads,
            n_embd=recipe.d_model,
            n_positions=recipe.positions,
            vocab_size=vocab_size,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.kv_heads,
        hidden_size=recipe.d_model,
        intermediate_size=2 * recipe.d_model,
        max_position_embeddings=recipe.positions,
        vocab_size=vocab_size,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def targets(task) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions mask, target token at each position) for the metric positions of a task."""
    mask = task.metric_mask
    target = torch.zeros_like(task.clean_input_ids)
    if task.has_answers:
        target[:, -1] = task.correct_ids
    else:
        target[:, :-1] = task.clean_input_ids[:, 1:]
    return mask, target


def train(recipe: Recipe) -> dict:
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    model = build_model(recipe, len(tokenizer)).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    start = time.time()
    for step in range(recipe.steps):
        task_name = recipe.tasks[step % len(recipe.tasks)]
        task = make_task(task_name, tokenizer, n=recipe.batch, seed=TRAIN_SEED_BASE + step, **dict(recipe.task_options))
        mask, target = targets(task)
        logits = model(input_ids=task.clean_input_ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[mask], target[mask])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 250 == 0 or step == recipe.steps - 1:
            print(f"{recipe.name} step {step:5d} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()
    options = dict(recipe.task_options)
    accuracy = {
        t: round(task_accuracy(model, make_task(t, tokenizer, n=256, seed=1, **options), tokenizer), 4) for t in recipe.tasks
    }
    out = ZOO_DIR / recipe.name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    info = {
        "name": recipe.name,
        "architecture": recipe.architecture,
        "tasks": list(recipe.tasks),
        "accuracy": accuracy,
        "parameters": sum(p.numel() for p in model.parameters()),
        "task_options": options,
        "training": {
            "steps": recipe.steps,
            "batch": recipe.batch,
            "lr": recipe.lr,
            "seed": 0,
            "seconds": round(time.time() - start, 1),
            "script": "scripts/train_zoo.py",
        },
    }
    (out / "zoo.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info), flush=True)
    return info


if __name__ == "__main__":
    names = sys.argv[1:] or list(RECIPES)
    for name in names:
        train(RECIPES[name])
