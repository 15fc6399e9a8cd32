"""Synthetic circuit-discovery tasks and the word-level tokenizer of the shipped models."""

from .generators import (
    GENERATORS,
    TaskGenerator,
    docstring,
    greater_than,
    induction,
    ioi,
    make_task,
    register_task,
    single_token_ids,
)
from .vocab import build_tokenizer

__all__ = [
    "GENERATORS",
    "TaskGenerator",
    "build_tokenizer",
    "docstring",
    "greater_than",
    "induction",
    "ioi",
    "make_task",
    "register_task",
    "single_token_ids",
]
