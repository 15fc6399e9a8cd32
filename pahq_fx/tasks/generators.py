"""Task generators: clean/corrupted prompt pairs, metric positions and answer tokens, deterministic per seed.

Tokenizer-agnostic: prompts are built from words, and every word that matters (names, years, parameter names)
must be a single token of the given tokenizer, which is checked. Induction samples its tokens from a fixed word list
(``vocab.INDUCTION_TOKENS``), checked the same way.

The generators form a registry, :data:`GENERATORS`: adding a task is one function here (or in a user's own code)
decorated with :func:`register_task`, and the command line lists it. Torch is imported only when a task is built,
so that the command line offers the names without loading it.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import TaskError
from . import vocab

if TYPE_CHECKING:
    from ..acdc.task import Task


@dataclass(frozen=True)
class TaskGenerator:
    """A registered task: its generator, a one-line description, and the options it takes beyond ``n`` and ``seed``
    (name -> default, read off the generator's signature)."""

    name: str
    make: Callable[..., Task]
    help: str
    options: dict[str, Any]

    def __call__(self, tokenizer: Any, n: int = 32, seed: int = 0, **options: Any) -> Task:
        return self.make(tokenizer, n=n, seed=seed, **options)


GENERATORS: dict[str, TaskGenerator] = {}


def register_task(help: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Register the decorated ``generator(tokenizer, n, seed, **options) -> Task`` under its function name."""

    def register(make: Callable[..., Task]) -> Callable[..., Task]:
        if make.__name__ in GENERATORS:
            raise ValueError(f"task name {make.__name__!r} is taken")
        parameters = list(inspect.signature(make).parameters.values())
        if [p.name for p in parameters[:3]] != ["tokenizer", "n", "seed"]:
            raise TypeError(f"task generator {make.__name__} must take (tokenizer, n, seed, **options)")
        options = {p.name: p.default for p in parameters[3:]}
        GENERATORS[make.__name__] = TaskGenerator(make.__name__, make, help, options)
        return make

    return register


def single_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """Token id of each word; a word that is not exactly one token is a :class:`TaskError`."""
    from ..acdc.text_task import describe_tokenizer

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


def _encode(tokenizer: Any, prompts: list[list[str]]) -> list[list[int]]:
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1:
        raise TaskError("prompts of a task must all have the same number of words")
    return [single_token_ids(tokenizer, p) for p in prompts]


def _word_task(
    tokenizer: Any, name: str, clean: list[list[str]], corrupted: list[list[str]], correct: list[str], incorrect: list[str]
) -> Task:
    """A task of word prompts whose metric reads the last position, with a correct and an incorrect answer word."""
    import torch

    from ..acdc.task import Task

    return Task(
        torch.tensor(_encode(tokenizer, clean), dtype=torch.long),
        torch.tensor(_encode(tokenizer, corrupted), dtype=torch.long),
        correct_ids=torch.tensor(single_token_ids(tokenizer, correct)),
        incorrect_ids=torch.tensor(single_token_ids(tokenizer, incorrect)),
        name=name,
    )


@register_task(help="random tokens repeated once; the metric reads the second half")
def induction(tokenizer: Any, n: int = 32, seed: int = 0, half: int = 8) -> Task:
    """Random token sequences repeated once: ``x1..xk x1..xk``. The metric reads every position of the second
    half (predicting the repeated token); the corrupted prompt has a different first half."""
    import torch

    from ..acdc.task import Task

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


@register_task(help="indirect object: 'When A and B went to the store, B gave a drink to' -> A")
def ioi(tokenizer: Any, n: int = 32, seed: int = 0) -> Task:
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
    return _word_task(tokenizer, "ioi", clean, corrupted, correct, incorrect)


@register_task(help="'The war lasted from the year 17YY to the year 17' -> a year above YY")
def greater_than(tokenizer: Any, n: int = 32, seed: int = 0) -> Task:
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
    return _word_task(tokenizer, "greater_than", clean, corrupted, correct, incorrect)


@register_task(help="a docstring's next :param -> the signature's parameter it has not named yet")
def docstring(tokenizer: Any, n: int = 32, seed: int = 0) -> Task:
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
    return _word_task(tokenizer, "docstring", clean, corrupted, correct, incorrect)


def make_task(name: str, tokenizer: Any, n: int = 32, seed: int = 0, **options: Any) -> Task:
    """Generate the named task; an unknown name is a :class:`TaskError` listing the known ones.

    ``options`` go to the generator (``half=32`` gives 64-token induction prompts)."""
    if name not in GENERATORS:
        raise TaskError(f"unknown task {name!r}; choose one of {', '.join(GENERATORS)} or give a task file")
    if n < 1:
        raise TaskError(f"a task needs at least one example, got n={n}")
    from ..acdc.text_task import check_tokenizer

    check_tokenizer(tokenizer)
    try:
        return GENERATORS[name](tokenizer, n=n, seed=seed, **options)
    except TypeError as error:
        takes = ", ".join(f"{k}={v!r}" for k, v in GENERATORS[name].options.items()) or "none"
        raise TaskError(f"task {name!r} does not take options {sorted(options)} (it takes: {takes}): {error}") from None
