"""Validated configuration dataclasses: one per stage, the same object from notebook to solver.

A field is declared with :func:`param`, which records its help text, the values it allows and whether
it is ``resumable``: a field that does not change the numbers a run produces (where it writes, how it
reports, which device), so a run folder may resume under another value of it. Every field is checked
when the config is built (type, range, choices), and the error names the field, the value and what is
allowed. Unknown keys are an error, never a warning: a misspelt papermill parameter must not silently
run the default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from typing import Any, Callable

_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config field has a value outside what it allows, or a key is unknown."""


def param(default: Any, help: str, *, choices: tuple | None = None, low: float | None = None,
          high: float | None = None, low_inclusive: bool = True, high_inclusive: bool = True,
          resumable: bool = False, check: Callable[[str, Any], None] | None = None) -> Any:
    """Declare a config field with its allowed values.

    ``low``/``high`` bound numbers (and every element of a tuple); ``choices`` lists the allowed values;
    ``check(name, value)`` raises :class:`ConfigError` for any other rule; ``resumable=True`` marks a
    field that does not change the numbers of a run (see the module docstring).
    """
    meta = {"help": help, "choices": choices, "low": low, "high": high, "low_inclusive": low_inclusive,
            "high_inclusive": high_inclusive, "resumable": resumable, "check": check}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed in configs; use a tuple")
    return dataclasses.field(default=default, metadata=meta)


DEVICE_RULE = "'auto', 'cpu', 'cuda' or 'cuda:N' (N a GPU index)"


def check_device(name: str, value: str) -> None:
    """A device string a stage can use: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:N'."""
    if value not in ("auto", "cpu") and re.fullmatch(r"cuda(:\d+)?", value) is None:
        raise ConfigError(f"{name}={value!r} is not allowed; {name} must be {DEVICE_RULE}")


def device_param(help: str = "where to run") -> Any:
    """The ``device`` field every stage has (resumable: a run may move between devices)."""
    return param("auto", f"{help}: {DEVICE_RULE}", resumable=True, check=check_device)


def _allowed_text(meta: dict) -> str:
    if meta.get("choices") is not None:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    lo, hi = meta.get("low"), meta.get("high")
    parts = []
    if lo is not None:
        parts.append(f"{'>=' if meta['low_inclusive'] else '>'} {lo:g}")
    if hi is not None:
        parts.append(f"{'<=' if meta['high_inclusive'] else '<'} {hi:g}")
    return " and ".join(parts) if parts else "any value of the declared type"


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the annotation; return it (ints are accepted, and kept, for floats)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _check_type(name, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is tuple:
        if isinstance(value, list):  # JSON and papermill give lists
            value = tuple(value)
        if not isinstance(value, tuple):
            raise ConfigError(f"{name}={value!r} must be a tuple")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(name, v, args[0]) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{name}={value!r} must have {len(args)} elements")
        return tuple(_check_type(name, v, a) for v, a in zip(value, args))
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}={value!r} must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"{name}={value!r} must be finite")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name}={value!r} must be an integer")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be True or False")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r} must be a string")
        return value
    if hint is Any:
        return value
    raise TypeError(f"config field {name!r} has an unsupported annotation {hint!r}")


def _check_range(name: str, value: Any, meta: dict) -> None:
    if value is None:
        return
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{name}={value!r} is not allowed; {name} must be {_allowed_text(meta)}")
    lo, hi = meta.get("low"), meta.get("high")
    for v in (value if isinstance(value, tuple) else (value,)):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        too_low = lo is not None and (v < lo if meta["low_inclusive"] else v <= lo)
        too_high = hi is not None and (v > hi if meta["high_inclusive"] else v >= hi)
        if too_low or too_high:
            raise ConfigError(f"{name}={value!r} is out of range; {name} must be {_allowed_text(meta)}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class: validates every field on construction; subclasses add cross-field checks in
    :meth:`check`."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _check_type(f.name, getattr(self, f.name), hints[f.name])
            _check_range(f.name, value, f.metadata)
            if f.metadata.get("check") is not None and value is not None:
                f.metadata["check"](f.name, value)
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Cross-field constraints; raise :class:`ConfigError` naming the fields."""

    # ---- construction from outside data --------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def resumable_fields(cls) -> frozenset[str]:
        """The fields declared ``resumable``: a run may resume under other values of these."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable"))

    @classmethod
    def from_saved(cls, values: dict[str, Any]):
        """The config of a run saved by an earlier version of the kit: fields added since take the value
        that reproduces what that run did (``SAVED_DEFAULTS`` of the class), renamed fields their new
        name (``RENAMED``), not today's defaults."""
        values = {getattr(cls, "RENAMED", {}).get(k, k): v for k, v in values.items()}
        values = {**getattr(cls, "SAVED_DEFAULTS", {}), **values}
        # fields that once took None for "the chain's own" and now name it: {field: values -> value}
        for name, resolve in getattr(cls, "SAVED_NONE", {}).items():
            if name in values and values[name] is None:
                values[name] = resolve(values)
        return cls.from_dict(values)

    def identity(self) -> dict[str, Any]:
        """The fields that determine the numbers of a run: all but the resumable ones."""
        skip = self.resumable_fields()
        return {k: v for k, v in self.to_dict().items() if k not in skip}

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Build from a mapping; an unknown key is an error that suggests the closest field."""
        known = cls.field_names()
        unknown = [k for k in values if k not in known]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, known, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"unknown {cls.__name__} parameter(s): {', '.join(hints)}. "
                              f"Known parameters: {', '.join(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def replace(self, **changes):
        """A copy with some fields changed (validated like any construction)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    @classmethod
    def describe(cls) -> str:
        """One line per field: name, default, allowed values, help (for README and notebooks)."""
        rows = []
        for f in dataclasses.fields(cls):
            rows.append(f"{f.name} = {f.default!r}  [{_allowed_text(f.metadata)}]  {f.metadata.get('help', '')}")
        return "\n".join(rows)
