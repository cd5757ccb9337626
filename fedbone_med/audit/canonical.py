"""Canonical JSON: the one byte encoding of a record that is hashed and signed.

Protects against ambiguity: two encodings of "the same" record would let an editor change
bytes without changing meaning (or the reverse), so exactly one encoding is accepted.
Rules: UTF-8, keys sorted, no insignificant whitespace, ``ensure_ascii=False``, integers
as integers, floats by Python's shortest round-trip ``repr``, NaN/Infinity refused, only
``str``/``int``/``float``/``bool``/``None``/``list``/``dict`` (with ``str`` keys) allowed.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from .errors import AuditError


def _check(value: Any, path: str) -> None:
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditError(f"canonical JSON: non-finite float at {path} (NaN/Infinity are not allowed)")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditError(f"canonical JSON: non-string key {key!r} at {path}")
            _check(item, f"{path}.{key}")
        return
    raise AuditError(f"canonical JSON: type {type(value).__name__} at {path} is not allowed")


# check_circular=False: values are either parsed JSON or walked by _check first (a cycle fails there)
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                            check_circular=False)


def canonical_text(value: Any, *, parsed: bool = True) -> str:
    """The canonical JSON of ``value`` as text (``canonical_json`` is its UTF-8 encoding).

    Defaults to ``parsed=True``: for a value that came straight from ``json.loads``. Raises only
    :class:`AuditError` (also for a value nested too deeply to encode, and for NaN/Infinity).
    """
    try:
        if not parsed:
            _check(value, "$")
        return _ENCODER.encode(value)
    except RecursionError:  # hostile input nested deeper than the interpreter's recursion limit
        raise AuditError("canonical JSON: value nested too deeply") from None
    except ValueError:  # a NaN/Infinity in a parsed value: json.loads accepts them unless told not to
        raise AuditError("canonical JSON: non-finite float (NaN/Infinity are not allowed)") from None
    except TypeError:  # parsed=True given a value that did not come from json.loads
        raise AuditError("canonical JSON: a value of a type JSON does not have") from None


def canonical_json(value: Any, *, parsed: bool = False) -> bytes:
    """Return the canonical UTF-8 JSON encoding of ``value`` or raise AuditError.

    ``parsed=True`` skips the type walk for a value that came straight from ``json.loads``
    with NaN/Infinity refused (it can only hold JSON types); ``allow_nan=False`` still applies.
    """
    try:
        return canonical_text(value, parsed=parsed).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: json.loads makes one from a "\ud800" escape
        raise AuditError("canonical JSON: a string holds a lone surrogate (not encodable as UTF-8)") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
