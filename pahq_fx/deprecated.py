"""Renamed keyword arguments that keep working for one release, with a warning naming the new one."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def renamed(old: str, new: str) -> Callable[[F], F]:
    """Accept ``old=`` as ``new=`` with a :class:`DeprecationWarning`; the signature shown is the new one alone."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(f"{function.__name__}() got both {old}= and {new}=; pass {new}= alone")
                warnings.warn(
                    f"{function.__name__}({old}=...) is deprecated and will be removed in the next release; use {new}=...",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        # functools.wraps keeps the signature users see, but mypy types the wrapper as (*Any, **Any) -> Any, not F
        return wrapper  # type: ignore[return-value]

    return decorate
