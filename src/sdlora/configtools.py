"""Typed-dataclass configuration machinery: strict loading, overrides, YAML I/O and diffs.

Every config section in sdlora is a ``@dataclass`` owned by the module it configures. This module turns plain data
(YAML files, ``--set a.b=value`` overrides) into those dataclasses and back, and it is deliberately strict:

* unknown keys raise, naming the full key path and suggesting the closest valid key (a silently ignored
  misspelled key is how the official SD-LoRA code ended up ignoring its scheduler settings);
* values are type-checked against the field annotations, with no silent coercion except ``int -> float``;
* ``ValueError`` from a dataclass's ``__post_init__`` is re-raised with the key path of that section.

Supported annotations: ``int``, ``float``, ``bool``, ``str``, ``X | None``, unions of scalars, ``list[X]``,
``tuple[X, ...]`` / ``tuple[X, Y]``, ``dict[str, X]``, ``Literal[...]``, nested dataclasses and ``typing.Any``.

This module imports no torch and no other sdlora module except :mod:`sdlora.fileio`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

import yaml

from .fileio import atomic_write_text

__all__ = [
    "ConfigError",
    "apply_overrides",
    "override_key",
    "diff",
    "dump_yaml",
    "from_dict",
    "load_yaml",
    "to_dict",
]

T = TypeVar("T")

_NoneType = type(None)
_SCALARS = (bool, int, float, str)


class ConfigError(ValueError):
    """Invalid configuration data.

    Attributes:
        path: Dotted key path of the offending entry (``"method.adapter.rank"``); ``""`` for the top level or
            when the error is not tied to one key (a file that cannot be parsed).
        message: The reason, without path or source.
        source: Where the value came from (a config file, or ``--set key=value``), when known.
    """

    def __init__(self, message: str, path: str = "", source: str | None = None) -> None:
        self.path = path
        self.message = message
        self.source = source
        where = ": ".join(p for p in (source, path) if p)
        super().__init__(f"{where}: {message}" if where else message)

    def with_source(self, source: str) -> ConfigError:
        """The same error attributed to ``source`` (the message reads ``source: key.path: reason``)."""
        return ConfigError(self.message, self.path, source)


class _TypeMismatch(ConfigError):
    """A value of the wrong kind at exactly this path (as opposed to an error found inside it)."""


# --------------------------------------------------------------------------------------------------------------------
# type helpers
# --------------------------------------------------------------------------------------------------------------------


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    """Human-readable annotation, e.g. ``list[int]``, ``int | None``, ``one of 'a', 'b'``."""
    if tp is Any:
        return "any"
    if tp is _NoneType:
        return "null"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{_type_name(args[0])}, ...]"
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    if dataclasses.is_dataclass(tp):
        return f"mapping ({getattr(tp, '__name__', type(tp).__name__)})"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    """``repr`` of a received value plus its YAML-ish type, shortened so a huge list does not flood the message."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    kind = "null" if value is None else type(value).__name__
    return f"{text} ({kind})"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"valid keys: {', '.join(valid) if valid else '(none)'}{hint}"


def _init_fields(cls: type) -> list[dataclasses.Field[Any]]:
    # Fields with init=False are derived state; they cannot be passed to the constructor, so they are not config keys.
    return [f for f in dataclasses.fields(cls) if f.init]


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as e:  # a string annotation that does not resolve is a schema bug, not a user error
        raise TypeError(f"cannot resolve type hints of {cls.__qualname__}: {e}") from e


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return the converted value (tuples, floats, dataclasses)."""
    if tp is Any:
        return value
    if tp is _NoneType:
        if value is None:
            return None
        raise _TypeMismatch(f"expected null, got {_show(value)}", path)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _TypeMismatch(f"expected a mapping for section {tp.__name__}, got {_show(value)}", path)
        return from_dict(tp, value, path)
    if _is_union(tp):
        return _convert_union(tp, value, path)

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        # Compare type too: True == 1 in Python, but a bool is not a valid value of Literal[1].
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return allowed
        raise _TypeMismatch(f"expected {_type_name(tp)}, got {_show(value)}", path)
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise _TypeMismatch(f"expected {_type_name(tp)}, got {_show(value)}", path)
        item = args[0] if args else Any
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _TypeMismatch(f"expected {_type_name(tp)}, got {_show(value)}", path)
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _TypeMismatch(f"expected {_type_name(tp)} with {len(args)} items, got {_show(value)}", path)
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise _TypeMismatch(f"expected {_type_name(tp)}, got {_show(value)}", path)
        key_tp, val_tp = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            out[_convert(key_tp, k, _join(path, str(k)))] = _convert(val_tp, v, _join(path, str(k)))
        return out
    if tp is bool:
        # Strict: YAML `yes`/`on` already arrive as bools; 0/1 or "true" here are most likely mistakes.
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # No float field read through here (config sections, run records) means anything at NaN or infinity
            # (YAML's .nan/.inf), and NaN passes every "x <= 0" check in a __post_init__: refused for all at once.
            try:
                if math.isfinite(value):
                    return float(value)
            except OverflowError:  # an int too large for a float
                pass
            raise _TypeMismatch(f"expected a finite number, got {_show(value)}", path)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported annotation {tp!r} at '{path}' in a config dataclass")
    raise _TypeMismatch(f"expected {_type_name(tp)}, got {_show(value)}", path)


def _convert_union(tp: Any, value: Any, path: str) -> Any:
    args = typing.get_args(tp)
    if value is None:
        if _NoneType in args or Any in args:
            return None
        raise _TypeMismatch(f"expected {_type_name(tp)}, got {_show(value)}", path)
    options = [a for a in args if a is not _NoneType]
    # Exact scalar matches first, so `int | float` keeps 3 an int and `int | bool` keeps True a bool.
    for a in options:
        if a in _SCALARS and type(value) is a and not (a is float and not math.isfinite(value)):
            return value
    errors: list[ConfigError] = []
    for a in options:
        try:
            return _convert(a, value, path)
        except ConfigError as e:
            errors.append(e)
    # For `X | None` an error from inside X (a list item, a section's key or __post_init__) is the more precise one.
    if len(options) == 1 and not (isinstance(errors[0], _TypeMismatch) and errors[0].path == path):
        raise errors[0]
    if isinstance(value, float) and not math.isfinite(value) and float in options:
        raise _TypeMismatch(f"expected a finite number{' or null' if _NoneType in args else ''}, got {value}", path)
    raise _TypeMismatch(f"expected {_type_name(tp)}, got {_show(value)}", path)


# --------------------------------------------------------------------------------------------------------------------
# dataclass <-> plain data
# --------------------------------------------------------------------------------------------------------------------


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build the (possibly nested) dataclass ``cls`` from plain data, checking keys and types.

    Args:
        cls: A dataclass type. Annotations may be strings (``from __future__ import annotations``).
        data: Mapping of field name to value, e.g. loaded from YAML. Missing fields take their defaults.
        path: Key path of ``data`` inside the whole config, used as the prefix in error messages.

    Returns:
        An instance of ``cls``. ``list``/``tuple``/``dict`` values are fresh containers; ints given for ``float``
        fields are converted to float.

    Raises:
        ConfigError: For a non-mapping ``data``, an unknown key (the message lists the valid keys and the closest
            match), a value of the wrong type, a missing required field, or a ``ValueError`` raised by the
            dataclass's ``__post_init__`` (re-raised with ``path`` as prefix).
        TypeError: If ``cls`` is not a dataclass or uses an unsupported annotation (a bug in the schema).
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise _TypeMismatch(f"expected a mapping for section {cls.__name__}, got {_show(data)}", path)
    fields = _init_fields(cls)
    names = [f.name for f in fields]
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"keys must be strings, got {_show(key)}; {_suggest(str(key), names)}", path)
        if key not in names:
            raise ConfigError(f"unknown key '{key}'; {_suggest(key, names)}", _join(path, key))
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields:
        fpath = _join(path, f.name)
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], fpath)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key (type {_type_name(hints[f.name])})", fpath)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        # __post_init__ validation: it knows the field name, only we know where the section sits in the config. A
        # message of the form "field: reason" names the field, so the key path can name it too.
        field_name, sep, reason = str(e).partition(": ")
        if sep and field_name in names:
            raise ConfigError(reason, _join(path, field_name)) from e
        raise ConfigError(str(e), path or cls.__name__) from e


def to_dict(obj: Any) -> Any:
    """Convert a dataclass instance (recursively) to plain YAML/JSON-able data.

    Tuples become lists and dict/list contents are converted recursively, so that
    ``from_dict(type(x), to_dict(x)) == x``. Fields declared with ``init=False`` are left out because
    :func:`from_dict` would reject them.

    Args:
        obj: A dataclass instance, or any nesting of dicts, lists, tuples and scalars.

    Returns:
        A ``dict`` for a dataclass; otherwise the converted value.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in _init_fields(type(obj))}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------------------------------

# YAML 1.1 (PyYAML) only treats "1.0e-3" as a float: "1e-3" and "5E-4", the way everyone writes learning rates,
# would load as strings and then fail the type check. Resolve them as floats too.
_FLOAT_RE = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML has no type hints here: SafeLoader is Any
    """Safe loader that reads ``1e-3`` as a float and rejects duplicate keys (the last one would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # the base constructor reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r} (first at line {seen[key].line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]  # as _Loader
    """Safe dumper: tuples as lists, short scalar lists inline (``ranks: [10, 8, 6]``), nested lists indented."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _represent_seq(dumper: yaml.SafeDumper, data: list[Any] | tuple[Any, ...]) -> yaml.Node:
    flow = all(v is None or isinstance(v, _SCALARS) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", list(data), flow_style=flow)


_Dumper.add_representer(list, _represent_seq)
_Dumper.add_representer(tuple, _represent_seq)


def _yaml_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a YAML config file into a dict.

    Floats written as ``1e-3`` load as floats, and duplicate keys are an error. An empty file gives ``{}``.

    Args:
        path: YAML file.

    Returns:
        The top-level mapping.

    Raises:
        ConfigError: If the file does not exist, is not valid YAML (the message has the line and column),
            or its top level is not a mapping. The message names the file.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    try:
        data = _yaml_value(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def dump_yaml(data: Any, path: str | os.PathLike[str] | None = None) -> str:
    """Serialize plain data (e.g. :func:`to_dict` output) to readable YAML.

    Keys keep their given order (the dataclass field order), lists of scalars are written inline, and the output
    loads back to equal data with :func:`load_yaml`.

    Args:
        data: Plain data; dataclass instances are converted with :func:`to_dict`.
        path: If given, the YAML is also written there atomically.

    Returns:
        The YAML text.
    """
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = to_dict(data)
    text: str = yaml.dump(
        data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=119
    )
    if path is not None:
        atomic_write_text(path, text)
    return text


# --------------------------------------------------------------------------------------------------------------------
# overrides
# --------------------------------------------------------------------------------------------------------------------


def _unwrap_optional(tp: Any) -> Any:
    """``Section | None`` -> ``Section``; anything else unchanged."""
    if _is_union(tp):
        options = [a for a in typing.get_args(tp) if a is not _NoneType]
        if len(options) == 1:
            return options[0]
    return tp


def _schema_type(cls: type, keys: list[str]) -> Any:
    """Walk ``keys`` through the dataclass schema and return the annotation of the last key."""
    tp: Any = cls
    for depth, key in enumerate(keys):
        here = ".".join(keys[: depth + 1])
        tp = _unwrap_optional(tp)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            names = [f.name for f in _init_fields(tp)]
            if key not in names:
                raise ConfigError(f"unknown key '{key}'; {_suggest(key, names)}", here)
            tp = _hints(tp)[key]
        elif tp is dict or typing.get_origin(tp) is dict:
            args = typing.get_args(tp)
            tp = args[1] if args else Any
        elif tp is Any:
            return Any
        else:
            parent = ".".join(keys[:depth])
            raise ConfigError(f"'{parent}' is a value of type {_type_name(tp)}, it has no key '{key}'", here)
    return tp


def _parse_override(item: str) -> tuple[list[str], Any]:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"malformed override {item!r}: expected key.path=value")
    key, _, raw = item.partition("=")
    keys = [k.strip() for k in key.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"malformed override {item!r}: empty key in '{key}'")
    try:
        value = _yaml_value(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse the value of override {item!r} as YAML: {e}", ".".join(keys)) from e
    return keys, value


def apply_overrides(data: Mapping[str, Any], overrides: list[str], cls: type | None = None) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to plain config data.

    Each value is parsed as YAML, so ``lr=1e-3`` gives a float, ``flag=true`` a bool, ``ranks=[10,8,6]`` a list,
    ``x=null`` None and ``name=sdlora`` a string (an empty value, ``x=``, is YAML null). Intermediate mappings are
    created as needed. Later overrides win over earlier ones.

    Args:
        data: Config data, e.g. from :func:`load_yaml`; it is not modified.
        overrides: Items of the form ``a.b.c=value``.
        cls: Optional root dataclass. When given, every key path must exist in its schema (errors suggest the
            closest key) and a value for a non-section field is type-checked right away. Keys below a
            ``dict[str, X]`` field are free.

    Returns:
        A new dict with the overrides applied.

    Raises:
        ConfigError: For an item without ``=``, an empty key, a value that is not valid YAML, a key path that is not
            in the schema, a wrongly typed value, or a path that runs through a non-mapping value. Its ``source`` is
            ``--set <item>``.
    """
    out: dict[str, Any] = _deepcopy_plain(data)
    for item in overrides:
        try:
            _apply_override(out, item, cls)
        except ConfigError as e:
            raise e.with_source(f"--set {item}") from None
    return out


def override_key(item: str) -> str:
    """The dotted key path an override ``a.b=value`` sets (``""`` if the item is malformed)."""
    key, sep, _ = item.partition("=")
    return ".".join(k.strip() for k in key.strip().split(".")) if sep else ""


def _apply_override(out: dict[str, Any], item: str, cls: type | None) -> None:
    keys, value = _parse_override(item)
    dotted = ".".join(keys)
    if cls is not None:
        tp = _schema_type(cls, keys)
        inner = _unwrap_optional(tp)
        # Sections given as a whole mapping are checked later by from_dict, which fills their defaults.
        if not (isinstance(inner, type) and dataclasses.is_dataclass(inner)):
            _convert(tp, value, dotted)
    node = out
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            here = ".".join(keys[: depth + 1])
            raise ConfigError(f"cannot set '{dotted}': '{here}' holds {_show(child)}, not a mapping", here)
        node = child
    node[keys[-1]] = value


def _deepcopy_plain(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deepcopy_plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy_plain(v) for v in data]
    return data


# --------------------------------------------------------------------------------------------------------------------
# diff
# --------------------------------------------------------------------------------------------------------------------

_MISSING_TEXT = "<missing>"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and not diff(a, b)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (
            isinstance(a, (list, tuple))
            and isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b, strict=True))
        )
    # True == 1 in Python, but a bool replacing an int is a real config change.
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (dict, list, tuple)):
        text: str = yaml.dump(value, Dumper=_Dumper, default_flow_style=True, sort_keys=False, width=10**6).strip()
        return text if len(text) <= 100 else text[:97] + "..."
    return "null" if value is None else str(value)


def diff(a: Mapping[str, Any], b: Mapping[str, Any], path: str = "") -> list[str]:
    """List the differences between two plain config dicts, e.g. to refuse resuming with a changed config.

    Nested mappings are compared key by key; lists and scalars as whole values (``1`` equals ``1.0``, but ``True``
    does not equal ``1``).

    Args:
        a: Old config.
        b: New config.
        path: Prefix for the key paths (used in recursion).

    Returns:
        One line per differing leaf, ``"a.b: old -> new"``, in the key order of ``a`` followed by keys only in ``b``;
        a key missing on one side shows as ``<missing>``. Empty if equal.
    """
    lines: list[str] = []
    for key in list(a) + [k for k in b if k not in a]:
        where = _join(path, str(key))
        if key not in b:
            lines.append(f"{where}: {_fmt(a[key])} -> {_MISSING_TEXT}")
        elif key not in a:
            lines.append(f"{where}: {_MISSING_TEXT} -> {_fmt(b[key])}")
        elif isinstance(a[key], Mapping) and isinstance(b[key], Mapping):
            lines.extend(diff(a[key], b[key], where))
        elif not _same(a[key], b[key]):
            lines.append(f"{where}: {_fmt(a[key])} -> {_fmt(b[key])}")
    return lines
