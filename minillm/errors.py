"""Errors minillm raises on bad input, and the checks that raise them.

Every public function validates its arguments at the boundary, so a student sees one sentence that
says what is wrong and what to do, not a traceback from deep inside numpy or torch. The CLI prints
a `MiniLLMError` as that sentence alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np


class MiniLLMError(Exception):
    """Base class of every error minillm raises on purpose."""


class InputError(MiniLLMError, ValueError):
    """A value has the right type but cannot be used (empty, NaN, too long, unknown name)."""


class InputTypeError(MiniLLMError, TypeError):
    """A value has the wrong type (a number where text is expected, text where numbers are)."""


def as_float_array(
    values: Any, name: str = "x", *, allow_nan: bool = False, min_size: int = 1
) -> np.ndarray:
    """Return `values` as a 1-D float64 array, or raise a clear error.

    Rejects strings, non-numeric items, arrays of more than one dimension, arrays shorter than
    `min_size`, infinities, and NaN unless `allow_nan` is true.
    """
    if isinstance(values, (str, bytes)):
        raise InputTypeError(f"{name} must be a sequence of numbers, got text {values!r:.40}")
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputTypeError(
            f"{name} must contain only numbers; converting it to floats failed: {exc}"
        ) from None
    if arr.ndim != 1:
        raise InputError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size < min_size:
        raise InputError(f"{name} needs at least {min_size} value(s), got {arr.size}")
    if np.isinf(arr).any():
        raise InputError(
            f"{name} contains an infinite value at index {int(np.isinf(arr).argmax())}"
        )
    if not allow_nan and np.isnan(arr).any():
        raise InputError(
            f"{name} contains NaN at index {int(np.isnan(arr).argmax())}; fill or drop missing "
            "values first (see the missing-value functions in minillm.preprocess)"
        )
    return arr


def require_text(value: Any, name: str = "text") -> str:
    """Return `value` if it is a `str`, else raise a clear `InputTypeError`."""
    if not isinstance(value, str):
        raise InputTypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def require_texts(values: Iterable[Any], name: str = "texts") -> list[str]:
    """Return `values` as a list of `str`, naming the first item that is not text."""
    if isinstance(values, str):
        raise InputTypeError(f"{name} must be a list of strings, got a single str")
    items = list(values)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InputTypeError(f"{name}[{i}] must be a str, got {type(item).__name__}")
    return items


def require_positive(value: Any, name: str, *, integer: bool = False) -> float:
    """Return `value` if it is a finite number > 0 (an int when `integer`), else raise."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputTypeError(f"{name} must be {kind} > 0, got {value!r}")
    if integer and not float(value).is_integer():
        raise InputTypeError(f"{name} must be an integer, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"{name} must be > 0, got {value!r}")
    return value


def unknown_name(kind: str, name: str, known: Iterable[str]) -> InputError:
    """An error for a name that is not one of `known`, listing the valid names."""
    return InputError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(known))}")
