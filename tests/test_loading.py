"""Where a model and its tokenizer come from: --device (checked before anything loads), --tokenizer, and a saved
word-level tokenizer that AutoTokenizer would turn into an empty byte-level BPE."""

import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import AutoTokenizer, GPT2TokenizerFast, LlamaConfig

import pahq_fx
from pahq_fx import cli, zoo
from tests.test_drawing import _circuit

WORDS = ["<pad>", "<unk>", "When", "Mary", "and", "John", "went", "to", "the", "store", ",", "gave", "a", "drink"]


@pytest.fixture(scope="module")
def word_level_folder(tmp_path_factory):
    """A model folder whose word-level tokenizer was saved through GPT2TokenizerFast: transformers 5's
    AutoTokenizer rebuilds it as a byte-level BPE with no merges, under which every prompt is empty."""
    folder = tmp_path_factory.mktemp("word_level")
    backend = Tokenizer(WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    GPT2TokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>").save_pretrained(folder)
    LlamaConfig(vocab_size=len(WORDS) + 1).save_pretrained(folder)
    return folder


PROMPT = "When Mary and John went to the store , John gave a drink to"


def test_a_saved_word_level_tokenizer_loads_as_saved(word_level_folder, tmp_path):
    words = [WORDS.index(w) for w in PROMPT.split()]
    assert AutoTokenizer.from_pretrained(word_level_folder).encode(PROMPT, add_special_tokens=False) != words  # the bug
    tokenizer = zoo.load_tokenizer(str(word_level_folder))
    assert tokenizer.encode(PROMPT, add_special_tokens=False) == words
    assert tokenizer.unk_token == "<unk>" and tokenizer.pad_token_id == 0
    task_file = tmp_path / "task.jsonl"
    task_file.write_text(json.dumps({"clean": PROMPT, "corrupted": PROMPT.replace("John gave", "Mary gave")}) + "\n")
    task = pahq_fx.Task.from_jsonl(task_file, tokenizer)
    assert (
        task.clean_input_ids.shape == (1, len(PROMPT.split())) and (task.clean_input_ids != task.corrupted_input_ids).sum() == 1
    )


def test_prompts_that_tokenize_to_nothing_name_the_tokenizer(word_level_folder, tmp_path):
    task_file = tmp_path / "task.jsonl"
    no_single_letters = "When John went to the store"  # the rebuilt BPE knows only its one-letter words: a ,
    task_file.write_text(json.dumps({"clean": no_single_letters, "corrupted": no_single_letters}) + "\n")
    with pytest.raises(
        pahq_fx.TaskError, match=rf"'clean' tokenizes to nothing with the tokenizer GPT2Tokenizer, from {word_level_folder}"
    ):
        pahq_fx.Task.from_jsonl(task_file, AutoTokenizer.from_pretrained(word_level_folder))


@pytest.mark.parametrize("command", ["discover", "sweep", "evaluate", "plan"])
@pytest.mark.parametrize(
    ("device", "message"), [("cuda", "is not available: this machine has only cpu"), ("gpu:0", "not a device name")]
)
def test_an_unavailable_device_is_one_line_before_the_model_loads(command, device, message, tmp_path, capsys, monkeypatch):
    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator")
    monkeypatch.setattr(cli, "_load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(cli, "_load_tokenizer", lambda *a, **k: pytest.fail("the tokenizer was loaded"))
    out = tmp_path / "out"
    args = {
        "discover": ["--threshold", "0.1", "--out", str(out)],
        "sweep": ["--thresholds", "0.1", "--out", str(out)],
        "evaluate": ["--circuit", str(tmp_path / "circuit.json")],
        "plan": [],
    }[command]
    _circuit((), [("embed", "resid_post", 1.0)]).save(tmp_path / "circuit.json")
    assert cli.main([command, "--model", "llama-ioi", "--task", "ioi", "--device", device, *args]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error and f"device {device!r}" in error
    assert not out.exists()


def test_tokenizer_overrides_the_model_folders_and_device_cpu_runs(tmp_path, capsys):
    """A checkpoint folder saved without its tokenizer evaluates with --tokenizer naming the shipped one."""
    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(zoo.available()["llama-ioi"].path / name, folder / name)
    _circuit((), [("embed", "resid_post", 1.0)], groups={}).save(tmp_path / "circuit.json")
    args = ["evaluate", "--circuit", str(tmp_path / "circuit.json"), "--model", str(folder), "--task", "ioi", "--n", "4"]
    assert cli.main(args) == 2
    assert "cannot load tokenizer" in capsys.readouterr().err
    assert cli.main([*args, "--tokenizer", "llama-ioi", "--device", "cpu"]) == 0
    assert "1/40 edges; kl: circuit" in capsys.readouterr().out
