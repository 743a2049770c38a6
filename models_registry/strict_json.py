"""Strict JSON for files a member controls (``config.json``, tokenizer files, the index).

Python's ``json`` accepts ``NaN`` and ``Infinity``, turns a 5,000-digit integer into a
``ValueError`` that is not a ``JSONDecodeError``, and parses ``1e308`` into a float that
overflows the first multiplication the planner makes. Here every number must be finite and at
most :data:`MAX_MAGNITUDE` in size, and the error names where the number is::

    loads('{"hidden_size": 1e308}')   # StrictJsonError: hidden_size: 1e308 is out of range ...
    check_numbers(config)             # the same check on an already parsed value
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

# 2**53: the largest integer every JSON reader holds exactly. Real configs stay far below it
# (vocabularies ~10**6, rope_theta ~10**9, context lengths ~10**7).
MAX_MAGNITUDE = 2**53
# Digits of an integer literal read at all: a longer one is out of range whatever it is, and
# converting it would cost quadratic time (CPython refuses past 4,300 digits).
MAX_INTEGER_DIGITS = 20


class StrictJsonError(ValueError):
    """Not strict JSON; the message names the key path and the offending value."""


class _Refused:
    """A number literal that was not converted; found by :func:`_first_refused`."""

    def __init__(self, literal: str):
        self.literal = literal if len(literal) <= 24 else f"{literal[:12]}… ({len(literal)} chars)"


def loads(raw: bytes | str) -> Any:
    """Parse ``raw`` like ``json.loads``; :class:`StrictJsonError` for a number that is not
    finite or out of range, ``json.JSONDecodeError`` / ``UnicodeDecodeError`` as usual."""
    refused: list[_Refused] = []

    def refuse(literal: str) -> _Refused:
        refused.append(_Refused(literal))
        return refused[-1]

    def integer(literal: str) -> int | _Refused:
        if len(literal.lstrip("-")) > MAX_INTEGER_DIGITS:
            return refuse(literal)
        value = int(literal)
        return value if abs(value) <= MAX_MAGNITUDE else refuse(literal)

    def real(literal: str) -> float | _Refused:
        value = float(literal)
        return value if math.isfinite(value) and abs(value) <= MAX_MAGNITUDE else refuse(literal)

    value = json.loads(raw, parse_int=integer, parse_float=real, parse_constant=refuse)
    if refused:  # walk only then, to name where the first one is
        for where, item in _walk(value):
            if isinstance(item, _Refused):
                raise StrictJsonError(_message(where, item.literal))
    return value


def check_numbers(value: Any) -> None:
    """The same rule for a value parsed elsewhere (a config stored before this check)."""
    for where, item in _walk(value):
        if isinstance(item, bool) or not isinstance(item, int | float):
            continue
        finite = math.isfinite(item) if isinstance(item, float) else True
        if not finite or abs(item) > MAX_MAGNITUDE:
            literal = repr(item) if isinstance(item, float) or abs(item) < 10**24 else "an integer"
            raise StrictJsonError(_message(where, literal))


def _message(where: str, literal: str) -> str:
    return (
        f"{where or 'the document'}: {literal} is not a usable number (numbers must be finite "
        f"and at most 2^53 in size)"
    )


def _walk(value: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{where}[{index}]")
    else:
        yield where, value
