"""Typed, data-only configuration loading.

Configuration files come from other institutions: they must never run code.
They are TOML, parsed into frozen dataclasses by :func:`from_mapping`, which

* rejects unknown keys (with a "did you mean" suggestion),
* checks every value's type against the dataclass annotation,
* runs each dataclass's own ``validate()`` for value ranges,
* and reports every problem at once in one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

T = TypeVar("T")


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is a ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"configuration file not found: {p}")
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``override`` merged in, tables recursively."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def from_mapping(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from a parsed mapping, or raise one ConfigError listing all problems."""
    problems: list[str] = []
    value = _convert(cls, data, where, problems)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return value  # type: ignore[return-value]


def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain JSON-compatible data (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are valid TOML escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    raise ConfigError(f"{where}: cannot write a {type(value).__name__} to TOML")


def to_toml(data: dict[str, Any], header: str = "") -> str:
    """Write a configuration mapping (``to_plain`` output) as TOML that ``read_toml`` reads back equal.

    ``None`` values are left out (they mean "not set": the loader's default is ``None`` too).
    """
    lines = [f"# {line}" for line in header.splitlines()]

    def table(prefix: str, mapping: dict[str, Any]) -> None:
        scalars = {k: v for k, v in mapping.items() if v is not None and not isinstance(v, dict)}
        tables = {k: v for k, v in mapping.items() if isinstance(v, dict)}
        if prefix and (scalars or not tables):
            lines.append(f"\n[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {_toml_value(v, prefix + '.' + k if prefix else k)}")
        for k, v in tables.items():
            table(f"{prefix}.{k}" if prefix else k, v)

    table("", data)
    return "\n".join(lines).lstrip("\n") + "\n"


def config_hash(obj: Any) -> str:
    """SHA-256 of the canonical JSON form of a configuration (for checkpoints and the audit log)."""
    canonical = json.dumps(to_plain(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# What a resumed run may change (``--resume`` with an edited configuration): the number of rounds of a
# run not yet finished, and the network settings (deadlines, min_sites, message sizes, wire dtype).
# Each change is recorded (audit ``config_change``); anything else needs a new run.
RESUMABLE_KEYS = ("rounds", "network.")


def flatten(plain: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a plain (``to_plain``) configuration. A list of tables (e.g. an experiment's
    ``sites``) is flattened per item ("sites[1].train.lr"); other lists are values."""
    if not isinstance(plain, dict):
        return {prefix: plain}
    out: dict[str, Any] = {}
    for k, v in plain.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, item in enumerate(v):
                out.update(flatten(item, f"{prefix}{k}[{i}]."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_NO_DEFAULT = object()


def field_default(cls: Any, dotted: str) -> Any:
    """The declared default of the dataclass field at ``dotted`` (e.g. "server.aggregation.project_every")
    under the dataclass type ``cls``; a unique sentinel if there is none (or the path leaves the dataclasses)."""
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return _NO_DEFAULT
        item = re.fullmatch(r"(\w+)\[\d+\]", part)  # an item of a list of tables: "sites[2]"
        name = item.group(1) if item else part
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            return _NO_DEFAULT
        f = fields[name]
        if i == len(parts) - 1:
            if item:
                return _NO_DEFAULT
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            return _NO_DEFAULT
        cls = hints[name]
        if item:  # tuple[X, ...] or list[X]: the item's type
            args = [a for a in get_args(cls) if a is not Ellipsis]
            if len(args) != 1:
                return _NO_DEFAULT
            cls = args[0]
    return _NO_DEFAULT


def resume_changes(before_json: str, after: Any, *, completed_rounds: int, where: str) -> list[str]:
    """The keys that differ between a checkpoint's configuration and this one, if a resume may change them.

    ``before_json``: the checkpoint's ``config_json`` (empty for checkpoints written before it existed);
    ``after``: this run's configuration. Raises CheckpointError naming every key that may not change
    (see :data:`RESUMABLE_KEYS`), or a ``rounds`` that would end the run before the rounds already done.
    """
    from .errors import CheckpointError

    if not before_json:
        raise CheckpointError(f"{where} was written for a different configuration and does not record which; "
                              "use a new --out directory")
    old, new = flatten(json.loads(before_json)), flatten(json.loads(json.dumps(to_plain(after), sort_keys=True)))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>"))
    # An option added to this software after the checkpoint was written, left at its default, changes
    # nothing the run did: it is reported (config_change) but not refused.
    added = {k for k in changed if k not in old and to_plain(field_default(type(after), k)) == new[k]}
    refused = [k for k in changed if not (k == "rounds" or k.startswith("network.") or k in added)]
    if refused:
        raise CheckpointError(f"{where} was written with another configuration: {', '.join(refused)} changed; a "
                              "resumed run may change only rounds and network.* settings; use a new --out directory "
                              "for anything else")
    if "rounds" in changed:
        old_rounds, new_rounds = int(old["rounds"]), int(new["rounds"])
        if completed_rounds >= old_rounds:
            raise CheckpointError(f"{where}: the run finished all its {old_rounds} rounds (its audit log is closed); "
                                  "start a new run to train further")
        if new_rounds <= completed_rounds:
            raise CheckpointError(f"{where}: rounds = {new_rounds}, but {completed_rounds} round(s) are already done")
    return changed


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        return f"list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "nothing"
    if dataclasses.is_dataclass(tp):
        return "table"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, where, problems)
    if origin is Literal:
        if value not in get_args(tp):
            problems.append(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in get_args(tp))}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _convert(arg, value, where, trial)
            if not trial:
                return out
        problems.append(f"{where}: expected {_type_name(tp)}, got {type(value).__name__}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list, got {type(value).__name__}")
            return value
        (item_tp, *rest) = get_args(tp)
        items = [_convert(item_tp, v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a table, got {type(value).__name__}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: expected a number, got {type(value).__name__}")
            return value
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {type(value).__name__}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            problems.append(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported configuration type {tp!r} at {where}")  # programming error


def _suggest(key: str, known: list[str]) -> str | None:
    """The known key a misspelt ``key`` most likely meant: one that starts like it ("stepz" ->
    "steps_per_round", "lr_rate" -> "lr"), else the closest by difflib; None if nothing is close."""
    low = key.lower()
    for n in range(min(len(low), 6), 3, -1):  # a shared start of 6, 5 or 4 characters, longest first
        starts = [k for k in known if k.lower().startswith(low[:n])]
        if len(starts) == 1:
            return starts[0]
    prefix = [k for k in known if low.startswith(k.lower()) and len(k) >= 2]
    if len(prefix) == 1:
        return prefix[0]
    close = difflib.get_close_matches(key, known, n=1)
    return close[0] if close else None


def _convert_dataclass(cls: Any, value: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a table, got {type(value).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in value:
        if key not in fields:
            close = _suggest(key, list(fields))
            hint = f" (did you mean {close!r}?)" if close else ""
            problems.append(
                f"{where}: unknown key {key!r}{hint}; allowed keys: {', '.join(sorted(fields))}"
            )
    kwargs: dict[str, Any] = {}
    before = len(problems)
    for name, field in fields.items():
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], f"{where}.{name}", problems)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            problems.append(f"{where}: missing required key {name!r}")
    if len(problems) > before:
        return None
    try:
        obj = cls(**kwargs)
    except ConfigError as exc:
        problems.append(f"{where}: {exc}")
        return None
    check = getattr(obj, "validate", None)
    if check is not None:
        problems.extend(f"{where}.{msg}" for msg in check())
    return obj
