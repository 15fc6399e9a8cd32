"""Every shipped model loads from the package, and reaches its stated accuracy on fresh task samples."""

import pytest

import pahq_fx
from pahq_fx import zoo
from pahq_fx.tasks import make_task

SHIPPED = zoo.available()


def test_models_are_shipped():
    architectures = {entry.architecture for entry in SHIPPED.values()}
    assert {"gpt2", "llama"} <= architectures
    for entry in SHIPPED.values():
        size = sum(f.stat().st_size for f in entry.path.iterdir())
        assert size < 5 * 2**20, f"{entry.name} is {size} bytes"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_reaches_stated_accuracy(name):
    entry = SHIPPED[name]
    model, tokenizer = zoo.load(name)
    for task_name, stated in entry.accuracy.items():
        fresh = make_task(task_name, tokenizer, n=128, seed=777, **entry.task_options)  # seeds the figure did not use
        assert zoo.task_accuracy(model, fresh, tokenizer) >= stated - 0.05


def test_llama_model_uses_grouped_query_attention():
    model, _ = zoo.load("llama-ioi")
    assert model.config.num_key_value_heads < model.config.num_attention_heads


def test_load_by_local_path_and_errors(tmp_path):
    model, tokenizer = zoo.load("gpt2-induction")
    model.save_pretrained(tmp_path / "copy")
    tokenizer.save_pretrained(tmp_path / "copy")
    loaded, _ = zoo.load(str(tmp_path / "copy"))
    assert type(loaded) is type(model)
    with pytest.raises(pahq_fx.PahqError, match="no such directory"):
        zoo.load(str(tmp_path / "missing"))
