"""The synthetic word vocabulary of the shipped models, and its word-level tokenizer (``tokenizers``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

NAMES = (
    "Mary",
    "John",
    "Tom",
    "Anna",
    "James",
    "Sarah",
    "Paul",
    "Kate",
    "Mike",
    "Lisa",
    "David",
    "Emma",
    "Peter",
    "Alice",
    "Mark",
    "Julia",
    "Sam",
    "Laura",
    "Dan",
    "Rose",
)
PLACES = ("store", "park", "school", "office", "garden", "beach", "market", "station")
OBJECTS = ("drink", "book", "ball", "gift", "letter", "key", "cake", "ring")
YEARS = tuple(f"{i:02d}" for i in range(100))
CODE_NAMES = (
    "x",
    "y",
    "z",
    "size",
    "name",
    "data",
    "path",
    "value",
    "index",
    "count",
    "mode",
    "key_id",
    "items",
    "limit",
    "flag",
    "text",
)
FUNCTION_WORDS = (
    "When",
    "and",
    "went",
    "to",
    "the",
    ",",
    "gave",
    "a",
    "The",
    "war",
    "lasted",
    "from",
    "year",
    "17",
    "def",
    "(",
    "self",
    ")",
    ":",
    '"""',
    ":param",
    "doc",
    "then",
    "Afterwards",
    "handed",
    "While",
    "were",
    "at",
    "in",
    "of",
    ".",
)
INDUCTION_TOKENS = tuple(f"t{i}" for i in range(64))
SPECIAL = ("<pad>", "<unk>")


def words() -> list[str]:
    """Every word of the vocabulary, in id order (ids are stable: new words go at the end)."""
    out: list[str] = []
    for group in (SPECIAL, NAMES, PLACES, OBJECTS, YEARS, CODE_NAMES, FUNCTION_WORDS, INDUCTION_TOKENS):
        out += [w for w in group if w not in out]
    return out


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over :func:`words`."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words())}
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>")
