"""Task generators: clean/corrupted prompt pairs, metric positions and answer tokens, deterministic per seed.

Tokenizer-agnostic: prompts are built from words, and every word that matters (names, years, parameter names)
must be a single token of the given tokenizer, which is checked. Induction samples its tokens from a fixed word list
(``vocab.INDUCTION_TOKENS``), checked the same way.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from ..acdc.task import Task
from ..acdc.text_task import check_tokenizer, describe_tokenizer
from ..errors import TaskError
from . import vocab


def single_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """Token id of each word; a word that is not exactly one token is a :class:`TaskError`."""
    ids = []
    for word in words:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if not encoded:
            raise TaskError(
                f"word {word!r} tokenizes to nothing with the tokenizer {describe_tokenizer(tokenizer)}; "
                "is it the model's tokenizer? (--tokenizer names another)"
            )
        if len(encoded) != 1 or encoded[0] == getattr(tokenizer, "unk_token_id", None):
            raise TaskError(f"word {word!r} is not a single known token of the tokenizer {describe_tokenizer(tokenizer)}")
        ids.append(encoded[0])
    return ids


def _encode(tokenizer, prompts: list[list[str]]) -> torch.Tensor:
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1:
        raise TaskError("prompts of a task must all have the same number of words")
    return torch.tensor([single_token_ids(tokenizer, p) for p in prompts], dtype=torch.long)


def induction(tokenizer, n: int = 32, seed: int = 0, half: int = 8) -> Task:
    """Random token sequences repeated once: ``x1..xk x1..xk``. The metric reads every position of the second
    half (predicting the repeated token); the corrupted prompt has a different first half."""
    token_ids = single_token_ids(tokenizer, vocab.INDUCTION_TOKENS)
    if not 1 <= half <= len(token_ids) // 2:
        raise TaskError(f"induction half length must be between 1 and {len(token_ids) // 2}, got {half}")
    rng = random.Random(seed)
    clean, corrupted = [], []
    for _ in range(n):
        first = rng.sample(token_ids, half)
        other = rng.sample([t for t in token_ids if t not in first], half)
        clean.append(first + first)
        corrupted.append(other + first)
    mask = torch.zeros(n, 2 * half, dtype=torch.bool)
    mask[:, half:-1] = True
    return Task(torch.tensor(clean), torch.tensor(corrupted), mask, name="induction")


IOI_TEMPLATES = (
    "When {A} and {B} went to the {P} , {B} gave a {O} to",
    "While {A} and {B} were at the {P} , {B} gave a {O} to",
    "Afterwards {A} and {B} went to the {P} , {B} handed a {O} to",
)


def ioi(tokenizer, n: int = 32, seed: int = 0) -> Task:
    """ "When A and B went to the store, B gave a drink to" -> A, with the first two names in either order
    (ABBA and BABA, so the answer's position gives nothing away). Corrupted: a third name C replaces the
    repeated B. Answers: A (correct) and B (incorrect)."""
    rng = random.Random(seed)
    clean, corrupted, correct, incorrect = [], [], [], []
    for i in range(n):
        a, b, c = rng.sample(vocab.NAMES, 3)
        template = IOI_TEMPLATES[i % len(IOI_TEMPLATES)]
        if rng.random() < 0.5:
            template = template.replace("{A} and {B}", "{B} and {A}")
        place, obj = rng.choice(vocab.PLACES), rng.choice(vocab.OBJECTS)
        words = template.format(A=a, B=b, P=place, O=obj).split()
        clean.append(words)
        corrupted.append([c if w == b and i > 3 else w for i, w in enumerate(words)])  # the repeated B
        correct.append(a)
        incorrect.append(b)
    return Task(
        _encode(tokenizer, clean),
        _encode(tokenizer, corrupted),
        correct_ids=torch.tensor(single_token_ids(tokenizer, correct)),
        incorrect_ids=torch.tensor(single_token_ids(tokenizer, incorrect)),
        name="ioi",
    )


def greater_than(tokenizer, n: int = 32, seed: int = 0) -> Task:
    """ "The war lasted from the year 17 YY to the year 17" -> a year above YY. Corrupted: YY = 01.
    Answers: a random year above YY (correct) and one below (incorrect)."""
    rng = random.Random(seed)
    clean, corrupted, correct, incorrect = [], [], [], []
    for _ in range(n):
        yy = rng.randint(2, 97)
        words = f"The war lasted from the year 17 {yy:02d} to the year 17".split()
        clean.append(words)
        corrupted.append([("01" if w == f"{yy:02d}" and i == 7 else w) for i, w in enumerate(words)])
        correct.append(f"{rng.randint(yy + 1, 99):02d}")
        incorrect.append(f"{rng.randint(0, yy - 1):02d}")
    return Task(
        _encode(tokenizer, clean),
        _encode(tokenizer, corrupted),
        correct_ids=torch.tensor(single_token_ids(tokenizer, correct)),
        incorrect_ids=torch.tensor(single_token_ids(tokenizer, incorrect)),
        name="greater_than",
    )


def docstring(tokenizer, n: int = 32, seed: int = 0) -> Task:
    """``def f ( self , A , B , C ) : \"\"\" doc :param A : doc :param B : doc :param`` -> C. Corrupted: the
    signature's parameter names are replaced by others. Answers: C (correct) and A (incorrect)."""
    rng = random.Random(seed)
    clean, corrupted, correct, incorrect = [], [], [], []
    for _ in range(n):
        a, b, c, *others = rng.sample(vocab.CODE_NAMES, 6)
        docs = f'""" doc :param {a} : doc :param {b} : doc :param'
        clean.append(f"def doc ( self , {a} , {b} , {c} ) : {docs}".split())
        corrupted.append(f"def doc ( self , {others[0]} , {others[1]} , {others[2]} ) : {docs}".split())
        correct.append(c)
        incorrect.append(a)
    return Task(
        _encode(tokenizer, clean),
        _encode(tokenizer, corrupted),
        correct_ids=torch.tensor(single_token_ids(tokenizer, correct)),
        incorrect_ids=torch.tensor(single_token_ids(tokenizer, incorrect)),
        name="docstring",
    )


GENERATORS: dict[str, Callable[..., Task]] = {
    "induction": induction,
    "ioi": ioi,
    "greater_than": greater_than,
    "docstring": docstring,
}


def make_task(name: str, tokenizer, n: int = 32, seed: int = 0, **options) -> Task:
    """Generate the named task; an unknown name is a :class:`TaskError` listing the known ones.

    ``options`` go to the generator (``half=32`` gives 64-token induction prompts)."""
    if name not in GENERATORS:
        raise TaskError(f"unknown task {name!r}; choose one of {', '.join(GENERATORS)} or give a task file")
    if n < 1:
        raise TaskError(f"a task needs at least one example, got n={n}")
    check_tokenizer(tokenizer)
    try:
        return GENERATORS[name](tokenizer, n=n, seed=seed, **options)
    except TypeError as error:
        raise TaskError(f"task {name!r} does not take options {sorted(options)}: {error}") from None
