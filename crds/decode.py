"""Decoding plain JSON data into the typed API dataclasses.

One walker does the structural part of validation for every API type: it checks
JSON types, required fields and unknown fields, applies defaults, and reports
every problem with its field path, all at once. Dataclass field names are the
snake_case form of the camelCase JSON names (``path_prefix`` <-> ``pathPrefix``).

A value that cannot be decoded is :data:`BROKEN`, and so is every array, map and
object holding one, up to the nearest optional field, which takes its default
instead (:func:`decode_partial`): the semantic rules can then still run on the rest
of the object, so that all of its errors are reported at once.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")

MISSING = dataclasses.MISSING


@dataclass(frozen=True)
class FieldError:
    """One problem with one field, Kubernetes-style: ``path: message``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class DecodeError(ValueError):
    """Raised by :func:`decode_or_raise`; carries every error found."""

    def __init__(self, errors: list[FieldError]):
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


def json_name(python_name: str) -> str:
    """``headers_to_add`` -> ``headersToAdd``; ``object_`` -> ``object``."""
    head, *rest = python_name.rstrip("_").split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


@cache
def _fields(cls: type) -> tuple[tuple[str, str, Any, dataclasses.Field[Any]], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, json_name(f.name), hints[f.name], f) for f in dataclasses.fields(cls))


def json_fields(cls: type) -> dict[str, Any]:
    """JSON field name -> Python type of a dataclass (used by the schema test)."""
    return {jname: hint for _, jname, hint, _ in _fields(cls)}


def is_required(field: dataclasses.Field[Any]) -> bool:
    return field.default is MISSING and field.default_factory is MISSING


def default_of(field: dataclasses.Field[Any]) -> Any:
    if field.default is not MISSING:
        return field.default
    if field.default_factory is not MISSING:
        return field.default_factory()
    return MISSING


class _Broken:
    def __repr__(self) -> str:
        return "BROKEN"


BROKEN: Any = _Broken()  # what a value that could not be decoded decodes to


def decode(cls: type[T], data: Any, path: str) -> tuple[T | None, list[FieldError]]:
    """Decode ``data`` into ``cls``; returns the object (None if unusable) and errors."""
    errors: list[FieldError] = []
    value = _decode_value(cls, data, path, errors, [])
    return (value if not errors else None), errors


def decode_partial(cls: type[T], data: Any, path: str) -> tuple[T | None, list[FieldError], list[str]]:
    """Decode ``data`` into ``cls`` as far as it goes: (object, errors, replaced paths).

    Without errors this is :func:`decode`. With errors, the object is the one ``data``
    would give were each field that failed to decode absent: the nearest optional field
    at or above each failure holds its default, and its path is in ``replaced``. The
    object is None when no optional field is above a failure (``cls`` itself is broken).
    Findings of rules run on such an object at, under or above a replaced path are
    consequences of the substitution, not of the data: see :func:`touches`.
    """
    errors: list[FieldError] = []
    replaced: list[str] = []
    value = _decode_value(cls, data, path, errors, replaced)
    return (None if value is BROKEN else value), errors, replaced


def touches(path: str, other: str) -> bool:
    """``path`` is ``other``, or one is inside the other (``a.b`` and ``a.b[0].c``).

    >>> touches("spec.a", "spec.a[0].b"), touches("spec.a.b", "spec"), touches("spec.ab", "spec.a")
    (True, True, False)
    """
    short, long = sorted((path, other), key=len)
    return long == short or long.startswith((short + ".", short + "["))


def decode_or_raise(cls: type[T], data: Any, path: str) -> T:
    value, errors = decode(cls, data, path)
    if errors:
        raise DecodeError(errors)
    assert value is not None
    return value


_JSON_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number"}


def type_name(data: Any) -> str:
    """The JSON type of decoded data, for messages: "string", "integer", "object", ..."""
    if data is None:
        return "null"
    if isinstance(data, bool):
        return "boolean"
    if isinstance(data, int):
        return "integer"
    if isinstance(data, float):
        return "number"
    if isinstance(data, str):
        return "string"
    if isinstance(data, list):
        return "array"
    if isinstance(data, dict):
        return "object"
    return type(data).__name__


def _decode_value(hint: Any, data: Any, path: str, errors: list[FieldError], replaced: list[str]) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if data is None:
            return None
        if members == [int, str]:  # IntOrString, used by quantities
            if isinstance(data, bool) or not isinstance(data, (int, str)):
                errors.append(FieldError(path, f"must be an integer or a string, got {type_name(data)}"))
                return BROKEN
            return str(data)
        (member,) = members
        return _decode_value(member, data, path, errors, replaced)
    if origin is tuple:  # tuple[X, ...]: a JSON array
        item = typing.get_args(hint)[0]
        if not isinstance(data, list):
            errors.append(FieldError(path, f"must be an array, got {type_name(data)}"))
            return BROKEN
        items = tuple(_decode_value(item, v, f"{path}[{i}]", errors, replaced) for i, v in enumerate(data))
        return BROKEN if BROKEN in items else items
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(data, dict):
            errors.append(FieldError(path, f"must be an object, got {type_name(data)}"))
            return BROKEN
        keys = [k for k in data if not isinstance(k, str)]  # YAML allows `{1: x}`; JSON cannot
        for key in keys:
            errors.append(FieldError(f"{path}[{key!r}]", f"keys must be strings, got {type_name(key)}"))
        if keys:
            return BROKEN
        if item is Any:
            return dict(data)
        entries = {k: _decode_value(item, v, f"{path}[{k}]", errors, replaced) for k, v in data.items()}
        return BROKEN if BROKEN in entries.values() else entries
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _decode_dataclass(hint, data, path, errors, replaced)
    if hint is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            errors.append(FieldError(path, f"must be a number, got {type_name(data)}"))
            return BROKEN
        return float(data)
    if hint in _JSON_TYPE_NAMES:
        if type(data) is not hint:
            errors.append(FieldError(path, f"must be {_JSON_TYPE_NAMES[hint]}, got {type_name(data)}"))
            return BROKEN
        return data
    if hint is Any:
        return data
    raise TypeError(f"unsupported type in API definition: {hint!r}")  # a bug, not bad input


def _decode_dataclass(cls: type, data: Any, path: str, errors: list[FieldError], replaced: list[str]) -> Any:
    if not isinstance(data, dict):
        errors.append(FieldError(path, f"must be an object, got {type_name(data)}"))
        return BROKEN
    known = set()
    kwargs: dict[str, Any] = {}
    broken = False
    for pname, jname, hint, field in _fields(cls):
        known.add(jname)
        child = f"{path}.{jname}"
        if jname not in data or data[jname] is None:
            if is_required(field):
                errors.append(FieldError(child, "required field is missing"))
                broken = True
            continue
        value = _decode_value(hint, data[jname], child, errors, replaced)
        if value is not BROKEN:
            kwargs[pname] = value
        elif is_required(field):
            broken = True
        else:  # as if absent: the field's default
            replaced.append(child)
    for unknown in sorted(set(data) - known):
        errors.append(FieldError(f"{path}.{unknown}", "unknown field"))
    return BROKEN if broken else cls(**kwargs)
