"""Typed, validated settings sections: the building block of every component's and baseline's configuration.

A section is a frozen dataclass deriving from :class:`Settings`. Its fields declare their type in the annotation and
their constraints with :func:`setting` (choices, range, whether ``None``/non-finite values make sense), so one
generic validator and one command-line parser serve every section, built-in or third-party::

    @dataclass(frozen=True)
    class MyConfig(Settings):
        strength: float = setting(0.5, range=(0.0, 1.0), doc="blend weight")
        mode: str = setting("fast", choices=("fast", "exact"))

Values are checked when a section is built (``MyConfig(strength=float("nan"))`` raises), so a bad value is refused
when the configuration is resolved — before any model loads — and the message names the key and what it accepts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

__all__ = ["Settings", "setting", "parse_setting", "SettingError"]


class SettingError(ValueError):
    """A configuration key or value is wrong; the message names the key, the value and what is accepted."""


def setting(
    default: Any,
    *,
    choices: tuple[Any, ...] | None = None,
    range: tuple[float | None, float | None] | None = None,  # noqa: A002 - reads naturally at the call site
    exclusive: bool = False,
    finite: bool = True,
    check: Callable[[Any], str | None] | None = None,
    parse: Callable[[str], Any] | None = None,
    doc: str = "",
) -> Any:
    """A dataclass field with its constraints.

    Args:
        default: the default value.
        choices: the only accepted values.
        range: inclusive ``(low, high)`` bounds for numbers (``None`` = unbounded); ``exclusive`` makes them strict.
        finite: refuse NaN and ±inf (the default; every setting here is a weight, a size or a threshold).
        check: extra validator returning an error text or ``None``.
        parse: command-line parser for values the annotation cannot describe (e.g. explicit head assignments).
        doc: one line shown by ``--print-config`` / ``cass-segment --list-settings``.
    """
    meta = {
        "choices": choices, "range": range, "exclusive": exclusive, "finite": finite, "check": check, "parse": parse,
        "doc": doc,
    }
    if isinstance(default, (list, dict, set)):
        raise TypeError("settings are immutable: use a tuple default")
    return field(default=default, metadata=meta)


def _hints(cls: type) -> dict[str, Any]:
    cached = cls.__dict__.get("_hints_cache")
    if cached is None:
        cached = typing.get_type_hints(cls)
        cls._hints_cache = cached
    return cached


def _union_args(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _type_name(tp: Any) -> str:
    names = []
    for arg in _union_args(tp):
        if arg is type(None):
            names.append("none")
        elif typing.get_origin(arg) is tuple:
            names.append(f"a comma-separated list of {_type_name(typing.get_args(arg)[0])}")
        else:
            names.append({bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(arg, str(arg)))
    return " or ".join(names)


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """``(ok, value)``: ``value`` as type ``tp`` (ints accepted for floats, lists for tuples), without parsing text."""
    for arg in _union_args(tp):
        if arg is type(None):
            if value is None:
                return True, None
        elif arg is Any:
            return True, _freeze(value)
        elif arg is bool:
            if isinstance(value, bool):
                return True, value
        elif arg is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True, value
        elif arg is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True, float(value)
        elif arg is str:
            if isinstance(value, str):
                return True, value
        elif typing.get_origin(arg) is tuple:
            if isinstance(value, (list, tuple)):
                item = typing.get_args(arg)[0]
                out = []
                for v in value:
                    ok, v = _coerce(v, item)
                    if not ok:
                        break
                    out.append(v)
                else:
                    return True, tuple(out)
        elif callable(arg) and typing.get_origin(arg) is None and isinstance(arg, type):
            if isinstance(value, arg):
                return True, value
    return False, value


def _freeze(value: Any) -> Any:
    """Lists become tuples (settings are immutable and hashable), recursively."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, tuple):
        return [x for v in value for x in _numbers(v)]
    return []


@dataclass(frozen=True)
class Settings:
    """Base class of settings sections (frozen; validated on construction).

    Class attributes:
        section: the section's name (``"spectral"``, ``"ops"``, ``"pipeline"``, a baseline's name ...); set by
            the registry when the section is registered.
    """

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            ok, coerced = _coerce(value, hints[f.name])
            key = self.key(f.name)
            if not ok:
                raise SettingError(f"{key}={value!r}: expected {_type_name(hints[f.name])}")
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
            error = _check_constraints(coerced, f.metadata)
            if error:
                raise SettingError(f"{key}={coerced!r}: {error}")

    @classmethod
    def key(cls, name: str) -> str:
        return f"{cls.section}.{name}" if cls.section else name

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def field_doc(cls, name: str) -> str:
        return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}[name]

    def replace(self, **values: Any) -> "Settings":
        unknown = sorted(set(values) - set(self.field_names()))
        if unknown:
            raise SettingError(
                f"unknown setting(s) {[self.key(u) for u in unknown]}; {self.section or 'this section'} has: "
                f"{', '.join(self.field_names()) or '(no settings)'}"
            )
        return dataclasses.replace(self, **values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _check_constraints(value: Any, meta: typing.Mapping[str, Any]) -> str | None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        return f"choose one of {', '.join(repr(c) for c in choices)}"
    nums = _numbers(value)
    if meta.get("finite", True) and any(not math.isfinite(x) for x in nums):
        return "must be a finite number (NaN and infinity are not meaningful here)"
    bounds = meta.get("range")
    if bounds is not None and nums:
        low, high = bounds
        strict = meta.get("exclusive", False)
        for x in nums:
            if math.isnan(x):
                continue
            below = low is not None and (x <= low if strict else x < low)
            above = high is not None and (x >= high if strict else x > high)
            if below or above:
                lo = "-inf" if low is None else f"{low:g}"
                hi = "inf" if high is None else f"{high:g}"
                bracket = ("(", ")") if strict else ("[", "]")
                return f"must lie in {bracket[0]}{lo}, {hi}{bracket[1]}"
    check = meta.get("check")
    if check is not None:
        return check(value)
    return None


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null", "off"}


def parse_setting(cls: type[Settings], name: str, text: str) -> Any:
    """Parse the command-line text of setting ``name`` of section ``cls`` into a value of the field's type.

    Raises:
        SettingError: the text is not of the field's type (the message names key, text and expected type).
    """
    if name not in cls.field_names():
        raise SettingError(f"unknown setting {cls.key(name)!r}; {cls.section or 'this section'} has: {', '.join(cls.field_names())}")
    tp = _hints(cls)[name]
    parser = next((f.metadata.get("parse") for f in dataclasses.fields(cls) if f.name == name), None)
    if parser is not None:
        return _freeze(parser(text))
    raw = text.strip()
    low = raw.lower()
    options = _union_args(tp)
    if type(None) in options and low in _NONE and not (str in options and low == "off"):
        return None
    for arg in options:
        if arg is bool:
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
        elif arg is int:
            try:
                return int(raw)
            except ValueError:
                pass
        elif arg is float:
            try:
                return float(raw)
            except ValueError:
                pass
        elif typing.get_origin(arg) is tuple:
            item = typing.get_args(arg)[0]
            try:
                values = json.loads(raw) if raw.startswith("[") else [v for v in raw.split(",") if v.strip()]
                return tuple(item(v) if not isinstance(v, str) or item is str else item(v.strip()) for v in values)
            except (ValueError, TypeError):
                pass
        elif arg is str:
            return raw
    raise SettingError(f"{cls.key(name)}={text!r}: expected {_type_name(tp)}")
