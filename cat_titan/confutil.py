"""Typed configuration engine: dataclass sections, YAML files, dotted CLI overrides.

A config is a tree of plain ``@dataclass`` sections. Each field is documented by a
string literal on the line(s) right after it (the attribute-docstring convention of
torchtitan's ``job_config.py``); :func:`field_docs` reads those from the source, so
``--help`` text, the ``config.yaml`` written to a run directory and the code share
one description.

Loading goes file -> overrides -> typed build -> semantic validation. Every stage
collects problems instead of stopping at the first, and :func:`load` raises one
:class:`ConfigError` listing all of them before any work starts (DESIGN.md, "CLI").
Precedence: ``key.path=value`` overrides beat the YAML file, which beats defaults.

Semantic checks live on the sections: a section (or the root) may define
``validate(self) -> list[str]`` returning problems. Messages are reported as
``<section path>: <message>`` unless they already start with that path.

Nothing here knows about concrete sections; those live in ``cat_titan/config.py``.
"""

from __future__ import annotations

import ast
import collections.abc
import contextlib
import copy
import dataclasses
import difflib
import enum
import functools
import inspect
import os
import re
import textwrap
import types
import typing
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "ABSENT",
    "ConfigError",
    "apply_overrides",
    "check",
    "describe",
    "diff",
    "dump_yaml",
    "field_docs",
    "from_dict",
    "load",
    "read_yaml",
    "replace_path",
    "to_dict",
    "undocumented",
]

T = TypeVar("T")

_NONE = type(None)


class _Invalid:
    """Marks a value that failed conversion (its problem is already recorded)."""

    def __repr__(self) -> str:
        return "<invalid>"


_INVALID: Any = _Invalid()


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Any = _Absent()
"""What :func:`diff` reports for a key that one side does not have (None is a real value)."""


class ConfigError(ValueError):
    """All problems found in a config; ``errors`` holds one message per problem."""

    def __init__(self, errors: Sequence[str], source: str | None = None) -> None:
        self.errors = list(errors)
        self.source = source
        n = len(self.errors)
        where = f" {source}" if source else ""
        head = f"{n} problem{'' if n == 1 else 's'} in config{where}:"
        # Continuation lines of a multi-line message stay under their number.
        body = "\n".join(
            f"  {i}. " + e.replace("\n", "\n     ") for i, e in enumerate(self.errors, 1)
        )
        super().__init__(f"{head}\n{body}")

    def __reduce__(self) -> tuple[Any, ...]:
        # The default would call ConfigError(message) on unpickling and turn the
        # message into a list of characters; errors do cross process boundaries.
        return (type(self), (self.errors, self.source))


# --------------------------------------------------------------------------- YAML

# PyYAML implements YAML 1.1, where a float needs a dot and a signed exponent: `lr: 3e-4`
# would load as the *string* "3e-4". Configs write learning rates exactly like that, so
# resolve exponent floats as YAML 1.2 does. The dumper gets the same rule, so that it
# quotes a string field whose value is "3e-4" and round trips stay exact.
_FLOAT_TAG = "tag:yaml.org,2002:float"
_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_NULL_TAG = "tag:yaml.org,2002:null"


class _Loader(yaml.SafeLoader):
    """SafeLoader with exponent floats and duplicate keys as errors."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        # PyYAML silently keeps the last of two equal keys; in a config that hides an
        # edit made to the wrong copy, so report it with its line instead.
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key; SafeConstructor rejects it itself
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings _Loader would read as floats; short lists inline."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(_FLOAT_TAG, _EXP_FLOAT, list("-+0123456789"))


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    # `layer_pattern: [cat, cat, dense]` reads better than one item per line.
    flow = all(isinstance(x, (str, int, float, bool)) or x is None for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def _flow(value: Any) -> str:
    """One-line YAML for a value, as a user would type it in an override."""
    text = yaml.dump(
        _plain(value), Dumper=_Dumper, default_flow_style=True, width=1 << 20
    )
    return text.removesuffix("\n").removesuffix("\n...").strip()


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping; a missing/unreadable file, bad YAML or a non-mapping top
    level raise ConfigError naming the path. An empty file is an empty mapping."""
    where = os.fspath(path)
    try:
        with open(where, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {where}"]) from None
    except OSError as exc:
        raise ConfigError([f"cannot read config file {where}: {exc.strerror or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{where}: invalid YAML{_yaml_problem(exc)}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{where}: the top level must be a mapping of sections, got {_got(data)}"]
        )
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """' at line L, column C: problem' — one line, unlike str(exc)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "syntax error"
        return f"{at}: {what}"
    return f": {exc}"


# -------------------------------------------------------------------------- types


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """(tp without its None member, whether None is an allowed value)."""
    if _is_union(tp):
        args = typing.get_args(tp)
        rest = tuple(a for a in args if a is not _NONE)
        if len(rest) < len(args):
            return (rest[0] if len(rest) == 1 else Union[rest]), True
    return tp, tp in (Any, object, _NONE)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _section_type(tp: Any) -> type | None:
    inner, _ = _split_optional(tp)
    return inner if _is_section(inner) else None


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


def _is_sequence_type(tp: Any) -> bool:
    return tp in (list, tuple) or typing.get_origin(tp) in (
        list,
        tuple,
        collections.abc.Sequence,
    )


def _is_mapping_type(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) in (dict, collections.abc.Mapping)


def _item_type(tp: Any, index: int) -> Any:
    """Type of item `index` of a list/tuple annotation (Any when unparameterised)."""
    args = typing.get_args(tp)
    if not args:
        return Any
    if typing.get_origin(tp) is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        return args[index] if index < len(args) else Any
    return args[0]


def _key_value_types(tp: Any) -> tuple[Any, Any]:
    args = typing.get_args(tp)
    return (args[0], args[1]) if len(args) == 2 else (Any, Any)


def _type_name(tp: Any) -> str:
    """How a type reads in errors and --help: `int | None`, `'cat' | 'dense'`."""
    if tp is _NONE:
        return "None"
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(_plain(a)) for a in typing.get_args(tp))
    if _is_enum(tp):  # users type the values, not the Python class
        return " | ".join(repr(m.value) for m in tp)
    origin = typing.get_origin(tp)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(tp, "__name__", str(tp))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved field annotations; works with `from __future__ import annotations`."""
    try:
        return typing.get_type_hints(cls)
    except NameError as exc:
        # Typically a class defined inside a function naming another local class under
        # `from __future__ import annotations`: only module globals are visible here.
        raise TypeError(
            f"cannot resolve the field types of {cls.__qualname__} ({exc}); "
            "define config classes at module level"
        ) from exc


@functools.cache
def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    # init=False fields are derived in __post_init__; they are neither read nor written.
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _got(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _same(a: Any, b: Any) -> bool:
    # True == 1 in Python; a config must not take one for the other.
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _suggest(word: str, candidates: Iterable[str]) -> str | None:
    hits = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return hits[0] if hits else None


def _unknown_key(path: str, key: str, valid: Iterable[str]) -> str:
    full = _join(path, key)
    valid = list(valid)
    hit = _suggest(key, valid)
    if hit is not None:
        return f"unknown key '{full}' (did you mean '{_join(path, hit)}'?)"
    where = f"section '{path}'" if path else "the top level"
    return f"unknown key '{full}' (valid keys of {where}: {', '.join(valid) or 'none'})"


# ---------------------------------------------------------------- typed building


class _Problems:
    """Messages plus where they occurred, so validation can skip tainted sections."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.paths: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.paths.append(path)
        self.messages.append(message)

    def wrong_type(self, path: str, tp: Any, value: Any, hint: str = "") -> Any:
        self.add(path, f"{path or 'config'}: expected {_type_name(tp)}, got {_got(value)}{hint}")
        return _INVALID


def _convert(tp: Any, value: Any, path: str, probs: _Problems) -> Any:
    """`value` checked against and normalised to `tp`, or _INVALID (problem recorded)."""
    inner, nullable = _split_optional(tp)
    if value is None:
        return None if nullable else probs.wrong_type(path, tp, value)
    tp = inner
    if tp is Any or tp is object:
        return value
    if _is_union(tp):
        # Plain unions (`int | str`): the first member that takes the value wins.
        for member in typing.get_args(tp):
            trial = _Problems()
            out = _convert(member, value, path, trial)
            if not trial.messages:
                return out
        return probs.wrong_type(path, tp, value)
    if _is_section(tp):
        if isinstance(value, tp):  # an instance is re-checked field by field
            value = _plain(value)
        if not isinstance(value, Mapping):
            probs.add(
                path,
                f"{path}: expected a mapping (section {tp.__name__}), got {_got(value)}",
            )
            return _INVALID
        return _build(tp, value, path, probs)
    if typing.get_origin(tp) is Literal or _is_enum(tp):
        return _convert_choice(tp, value, path, probs)
    if tp is bool:
        return value if isinstance(value, bool) else probs.wrong_type(path, tp, value)
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return value if ok else probs.wrong_type(path, tp, value)
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else probs.wrong_type(path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        scalar = isinstance(value, (int, float, bool))
        hint = " (quote it in YAML to make it a string)" if scalar else ""
        return probs.wrong_type(path, tp, value, hint)
    if _is_sequence_type(tp):
        return _convert_sequence(tp, value, path, probs)
    if _is_mapping_type(tp):
        return _convert_mapping(tp, value, path, probs)
    if isinstance(tp, type):
        return value if isinstance(value, tp) else probs.wrong_type(path, tp, value)
    raise TypeError(f"{path}: unsupported config field type {tp!r}")


def _convert_choice(tp: Any, value: Any, path: str, probs: _Problems) -> Any:
    """Literal[...] by value; Enum by member, value or name."""
    if _is_enum(tp):
        if isinstance(value, tp):
            return value
        for member in tp:
            if _same(member.value, value):
                return member
        if isinstance(value, str) and value in tp.__members__:
            return tp.__members__[value]
        allowed = [m.value for m in tp]
    else:
        allowed = list(typing.get_args(tp))
        for choice in allowed:
            if _same(choice, value):
                return choice
        # YAML 1.1 reads on/off/yes/no as booleans: map them back where the choices are words.
        if isinstance(value, bool):
            for words in (("on", "off"), ("true", "false"), ("yes", "no")):
                word = words[0] if value else words[1]
                if word in allowed:
                    return word
    hint = ""
    if isinstance(value, str):
        hit = _suggest(value, [a for a in allowed if isinstance(a, str)])
        hint = f" (did you mean {hit!r}?)" if hit else ""
    listed = ", ".join(repr(_plain(a)) for a in allowed)
    probs.add(path, f"{path}: expected one of {listed}, got {_got(value)}{hint}")
    return _INVALID


def _convert_sequence(tp: Any, value: Any, path: str, probs: _Problems) -> Any:
    if not isinstance(value, (list, tuple)):
        return probs.wrong_type(path, tp, value)
    args = typing.get_args(tp)
    fixed = typing.get_origin(tp) is tuple and args and not (len(args) == 2 and args[1] is Ellipsis)
    if fixed and len(value) != len(args):
        probs.add(path, f"{path}: expected {len(args)} items ({_type_name(tp)}), got {len(value)}")
        return _INVALID
    items = [_convert(_item_type(tp, i), v, f"{path}[{i}]", probs) for i, v in enumerate(value)]
    if any(item is _INVALID for item in items):
        return _INVALID
    return tuple(items) if (tp is tuple or typing.get_origin(tp) is tuple) else items


def _convert_mapping(tp: Any, value: Any, path: str, probs: _Problems) -> Any:
    if not isinstance(value, Mapping):
        return probs.wrong_type(path, tp, value)
    key_tp, value_tp = _key_value_types(tp)
    out: dict[Any, Any] = {}
    ok = True
    for key, item in value.items():
        where = _join(path, str(key))
        k = _convert(key_tp, key, where, probs)
        v = _convert(value_tp, item, where, probs)
        ok = ok and k is not _INVALID and v is not _INVALID
        out[k] = v
    return out if ok else _INVALID


def _build(cls: type[T], data: Mapping[str, Any], path: str, probs: _Problems) -> T:
    """One section from a mapping. On problems it still tries to return an instance
    (defaults standing in for bad values) so that other sections can be validated."""
    n_before = len(probs.messages)
    fields = _init_fields(cls)
    hints = _hints(cls)
    for key in data:
        if key not in fields:
            probs.add(_join(path, str(key)), _unknown_key(path, str(key), fields))
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        where, tp = _join(path, name), hints[name]
        if name in data:
            value = data[name]
            if value is None and not _split_optional(tp)[1]:
                hint = ""
                if _has_default(f):
                    hint = f"; remove the key to use the default {_flow(_default_of(f))}"
                converted = probs.wrong_type(where, tp, value, hint)
            else:
                converted = _convert(tp, value, where, probs)
            if converted is not _INVALID:
                kwargs[name] = converted
            elif not _has_default(f):
                kwargs[name] = None  # placeholder; the problem is already recorded
        elif _has_default(f):
            pass
        elif (section := _section_type(tp)) is not None:
            # A required section that is absent is built from its own defaults.
            built = _build(section, {}, where, probs)
            kwargs[name] = None if built is _INVALID else built
        else:
            probs.add(where, f"{where}: missing required key ({_type_name(tp)})")
            kwargs[name] = None
    try:
        return cls(**kwargs)
    except Exception as exc:
        if len(probs.messages) > n_before:
            # Placeholders tripped __post_init__; the real cause is already reported.
            return _INVALID
        if not isinstance(exc, (TypeError, ValueError)):
            raise
        probs.add(path, f"{path or cls.__name__}: {exc}")
        return _INVALID


def _build_root(cls: type[T], data: Any, path: str, probs: _Problems) -> T:
    if not _is_section(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        probs.add(path, f"{path or 'config'}: expected a mapping, got {_got(data)}")
        return _INVALID
    return _build(cls, data, path, probs)


def from_dict(cls: type[T], data: Mapping[str, Any], *, path: str = "") -> T:
    """Build dataclass `cls` from a nested mapping (e.g. YAML), defaults filling gaps.

    Checks types only (see :func:`check` for the validate hooks) and raises one
    ConfigError with every problem; `path` prefixes the keys in messages."""
    probs = _Problems()
    obj = _build_root(cls, data, path, probs)
    if probs.messages:
        raise ConfigError(probs.messages)
    return obj


# ------------------------------------------------------------ semantic checking


def _tainted(path: str, bad_paths: Sequence[str]) -> bool:
    if not path:
        return bool(bad_paths)
    return any(b == path or b.startswith((path + ".", path + "[")) for b in bad_paths)


def _validate_tree(obj: Any, path: str, bad_paths: Sequence[str]) -> list[str]:
    """Problems from every `validate()` hook, innermost sections first, root last.
    Sections with type problems are skipped: their values may be placeholders."""
    out: list[str] = []
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for name in _init_fields(type(obj)):
            out += _validate_tree(getattr(obj, name), _join(path, name), bad_paths)
        hook = getattr(obj, "validate", None)
        if callable(hook) and not _tainted(path, bad_paths):
            found = hook() or []
            for msg in [found] if isinstance(found, str) else found:
                done = not path or msg.startswith((path + ".", path + ":", path + " "))
                out.append(msg if done else f"{path}: {msg}")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            out += _validate_tree(item, f"{path}[{i}]", bad_paths)
    elif isinstance(obj, Mapping):
        for key, item in obj.items():
            out += _validate_tree(item, _join(path, str(key)), bad_paths)
    return out


def check(obj: Any) -> None:
    """Re-check an instance (types, then every validate hook); raise ConfigError.

    For configs changed after :func:`load`, e.g. by presets."""
    probs = _Problems()
    rebuilt = _build_root(type(obj), _plain(obj), "", probs)
    semantic = [] if rebuilt is _INVALID else _validate_tree(rebuilt, "", probs.paths)
    if probs.messages or semantic:
        raise ConfigError(probs.messages + semantic)


# -------------------------------------------------------------------- overrides

# Spellings of booleans accepted on the command line (YAML 1.1 has no 1/0).
_BOOL_WORDS = {
    "true": True, "yes": True, "on": True, "1": True,
    "false": False, "no": False, "off": False, "0": False,
}
_NULL_WORDS = {"null", "Null", "NULL", "~"}


def _path_type(cls: type, parts: list[str], label: str, probs: _Problems) -> Any:
    """Field type at a dotted path, walking sections and dict[str, X] fields.
    `label` prefixes problems, e.g. "override 'x=1': "."""
    tp: Any = cls
    for i, part in enumerate(parts):
        inner, _ = _split_optional(tp)
        parent = ".".join(parts[:i])
        if _is_section(inner):
            fields = _init_fields(inner)
            if part not in fields:
                msg = _unknown_key(parent, part, fields)
                probs.add(".".join(parts[: i + 1]), f"{label}{msg}")
                return _INVALID
            tp = _hints(inner)[part]
        elif _is_mapping_type(inner):
            tp = _key_value_types(inner)[1]
        elif inner is Any:
            tp = Any
        else:
            probs.add(
                parent,
                f"{label}'{parent}' is a value ({_type_name(tp)}), not a section; "
                f"it has no key '{part}'",
            )
            return _INVALID
    return tp


def _match_choice(tp: Any, text: str) -> Any:
    """The Literal choice / Enum member whose text is `text`, else _INVALID."""
    if _is_enum(tp):
        for member in tp:
            if text in (member.name, str(member.value)):
                return member
    elif typing.get_origin(tp) is Literal:
        for choice in typing.get_args(tp):
            if str(choice) == text:
                return choice
    return _INVALID


def _from_node(tp: Any, node: yaml.Node, loader: _Loader) -> Any:
    """Python value of a YAML node, read the way the target type wants: scalar text is
    kept as-is for str fields (`name=123` is "123"), and bool fields take 1/0."""
    inner, nullable = _split_optional(tp)
    if isinstance(node, yaml.ScalarNode):
        plain = node.style is None
        if nullable and plain and node.tag == _NULL_TAG:
            return None
        if inner is str:
            return node.value
        if inner is bool and plain and node.value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[node.value.lower()]
        if inner is float and plain:
            try:  # also `inf`, `nan`, which YAML spells .inf, .nan
                return float(node.value)
            except ValueError:
                pass
        choice = _match_choice(inner, node.value)
        if choice is not _INVALID:
            return choice
    elif isinstance(node, yaml.SequenceNode) and _is_sequence_type(inner):
        return [
            _from_node(_item_type(inner, i), child, loader) for i, child in enumerate(node.value)
        ]
    elif isinstance(node, yaml.MappingNode) and (_is_section(inner) or _is_mapping_type(inner)):
        out = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = key_node.value  # mapping keys are names: keep their text
            else:
                key = loader.construct_object(key_node, deep=True)
            if _is_section(inner):
                child_tp = _hints(inner).get(key, Any) if key in _init_fields(inner) else Any
            else:
                child_tp = _key_value_types(inner)[1]
            out[key] = _from_node(child_tp, value_node, loader)
        return out
    return loader.construct_object(node, deep=True)


def _parse_override_value(tp: Any, raw: str) -> Any:
    inner, nullable = _split_optional(tp)
    if nullable and raw.strip() in _NULL_WORDS:
        return None
    if inner is str:  # the whole text, even if it looks like YAML (`a: b`, `#1`)
        return raw
    loader = _Loader(raw)
    try:
        node = loader.get_single_node()
        return None if node is None else _from_node(tp, node, loader)
    finally:
        loader.dispose()


def _set_path(data: dict[str, Any], parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        child = data.get(part)
        # A non-mapping in the file where the override needs a section: override wins.
        child = dict(child) if isinstance(child, Mapping) else {}
        data[part] = child
        data = child
    data[parts[-1]] = value


def _apply(
    data: Mapping[str, Any], overrides: Iterable[str], cls: type, probs: _Problems
) -> dict[str, Any]:
    out = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not all(parts):
            probs.add(
                key if sep else "",
                f"bad override {item!r}: expected key.path=value, e.g. training.steps=100"
                + (f" (a config file goes after --config: --config {item})"
                   if not sep and item.endswith((".yaml", ".yml")) else ""),
            )
            continue
        tp = _path_type(cls, parts, f"override {item!r}: ", probs)
        if tp is _INVALID:
            continue
        try:
            value = _parse_override_value(tp, raw)
        except yaml.YAMLError as exc:
            probs.add(key, f"override {item!r}: cannot parse the value{_yaml_problem(exc)}")
            continue
        _set_path(out, parts, value)  # later overrides of one key win, as on any CLI
    return out


def apply_overrides(
    data: Mapping[str, Any],
    overrides: Iterable[str],
    cls: type,
    *,
    errors: list[str] | None = None,
) -> dict[str, Any]:
    """A copy of `data` with each `key.path=value` applied (values read as YAML, guided
    by the field type). Problems raise ConfigError, or are appended to `errors`.

    A mapping value replaces the whole subtree at its path (it does not merge)."""
    probs = _Problems()
    out = _apply(data, overrides, cls, probs)
    if errors is not None:
        errors.extend(probs.messages)
    elif probs.messages:
        raise ConfigError(probs.messages)
    return out


# ------------------------------------------------------------------------ load


def load(
    cls: type[T],
    path: str | os.PathLike[str] | None,
    overrides: Iterable[str] = (),
    *,
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> T:
    """Defaults <- YAML file (if any) <- overrides, type-checked, then every section's
    validate() hook; one ConfigError lists type problems first, then semantic ones.

    `prepare` may rewrite the merged plain data before it is built (e.g. fill fields
    from a named preset that the file and overrides did not set)."""
    data = read_yaml(path) if path is not None else {}
    probs = _Problems()
    data = _apply(data, overrides, cls, probs)
    if prepare is not None:
        data = prepare(data)
    obj = _build_root(cls, data, "", probs)
    semantic = [] if obj is _INVALID else _validate_tree(obj, "", probs.paths)
    if probs.messages or semantic:
        raise ConfigError(probs.messages + semantic, os.fspath(path) if path is not None else None)
    return obj


# ------------------------------------------------------------------ plain / YAML


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: _plain(getattr(value, name)) for name in _init_fields(type(value))}
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-safe: enums as values, tuples as lists), in field
    order; `from_dict(type(obj), to_dict(obj)) == obj`."""
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise TypeError(f"to_dict expects a dataclass instance, got {type(obj).__name__}")
    return _plain(obj)


def _emit(obj: Any, indent: int, lines: list[str], comments: bool) -> None:
    pad = " " * indent
    docs = _field_docs(type(obj)) if comments else {}
    for name in _init_fields(type(obj)):
        value = getattr(obj, name)
        is_section = dataclasses.is_dataclass(value) and _init_fields(type(value))
        if is_section and indent == 0 and lines:
            lines.append("")  # a blank line between top-level sections
        lines += [f"{pad}# {line}".rstrip() for line in docs.get(name, "").splitlines()]
        if is_section:
            lines.append(f"{pad}{name}:")
            _emit(value, indent + 2, lines, comments)
        else:
            text = yaml.dump(
                {name: _plain(value)}, Dumper=_Dumper, sort_keys=False, allow_unicode=True
            )
            lines += [pad + line for line in text.rstrip("\n").split("\n")]


def dump_yaml(
    obj: Any, path: str | os.PathLike[str] | None = None, *, comments: bool = True
) -> str:
    """YAML text of a config in field order (each key preceded by its doc as a comment
    unless comments=False); also written to `path` when given. `load` reads it back."""
    lines: list[str] = []
    _emit(obj, 0, lines, comments)
    text = "\n".join(lines) + "\n"
    if path is not None:
        write_atomic(path, text)
    return text


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write-then-rename: a full disk or a kill leaves the old file or the new one, never half
    of one (the data reach the disk before the name points at them). The temporary name is
    this writer's own, so writers racing for one path (run-directory leases) cannot mix."""
    tmp = f"{os.fspath(path)}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# ------------------------------------------------------------------------- docs


@functools.cache
def _source_docs(cls: type) -> tuple[str, dict[str, str]]:
    """(class docstring, {field: attribute docstring}) of one class body, from source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):  # no source (REPL, exec) -> no docs
        return "", {}
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    if node is None:
        return "", {}
    docs: dict[str, str] = {}
    for stmt, after in zip(node.body, node.body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return ast.get_docstring(node) or "", docs


def field_docs(cls: type) -> dict[str, str]:
    """{field name: docstring} for a dataclass, inherited fields included."""
    return dict(_field_docs(cls))  # a copy: callers must not edit the cache


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # subclasses override their bases' docs
        if dataclasses.is_dataclass(klass):
            docs.update(_source_docs(klass)[1])
    return {name: docs[name] for name in _init_fields(cls) if name in docs}


def undocumented(cls: type, *, path: str = "") -> list[str]:
    """Dotted keys, at any depth, whose field has no docstring (for a style test)."""
    missing: list[str] = []
    docs = _field_docs(cls)
    for name in _init_fields(cls):
        where = _join(path, name)
        if name not in docs:
            missing.append(where)
        section = _section_type(_hints(cls)[name])
        if section is not None:
            missing += undocumented(section, path=where)
    return missing


def describe(cls: type) -> str:
    """--help text: every key with its type, default and doc, sections nested."""
    try:
        defaults: Any = cls()
    except (TypeError, ValueError):  # required fields: fall back to per-field defaults
        defaults = None
    lines: list[str] = []
    _describe(cls, defaults, "", 0, lines)
    return "\n".join(lines)


def _describe(cls: type, defaults: Any, path: str, depth: int, lines: list[str]) -> None:
    pad = "  " * depth
    docs = _field_docs(cls)
    hints = _hints(cls)
    for name, f in _init_fields(cls).items():
        where, tp = _join(path, name), hints[name]
        if defaults is not None:
            has, default = True, getattr(defaults, name)
        else:
            has = _has_default(f)
            default = _default_of(f) if has else None
        section = _section_type(tp)
        doc = docs.get(name) or (_source_docs(section)[0] if section else "")
        if section is not None and (isinstance(default, section) or not has):
            lines.append(f"{pad}{where}:")
            inner_defaults = default if isinstance(default, section) else None
        else:
            shown = f" = {_flow(default)}" if has else " (required)"
            lines.append(f"{pad}{where}: {_type_name(tp)}{shown}")
            inner_defaults = None
        lines += [f"{pad}    {line}".rstrip() for line in doc.splitlines()]
        if section is not None:
            _describe(section, inner_defaults, where, depth + 1, lines)


# ------------------------------------------------------------------ diff / edit


def _flatten(value: Any, path: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            _flatten(item, _join(path, str(key)), out)
    else:
        out[path] = value
    return out


def diff(a: Any, b: Any, fields: Iterable[str] | None = None) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (a value, b value)} for every leaf that differs between two configs
    (instances or plain dicts, compared in plain form). ABSENT marks a missing key.
    `fields` limits the result to those keys and everything under them."""
    flat_a, flat_b = _flatten(_plain(a), "", {}), _flatten(_plain(b), "", {})
    wanted = None if fields is None else list(fields)
    out: dict[str, tuple[Any, Any]] = {}
    for key in list(flat_a) + [k for k in flat_b if k not in flat_a]:
        if wanted is not None and not any(key == w or key.startswith(w + ".") for w in wanted):
            continue
        va, vb = flat_a.get(key, ABSENT), flat_b.get(key, ABSENT)
        if va is ABSENT or vb is ABSENT or not _same(va, vb):
            out[key] = (va, vb)
    return out


def replace_path(obj: T, path: str, value: Any) -> T:
    """A deep copy of `obj` with the field at dotted `path` set to `value`, which is
    type-checked and normalised like a file value (a dict builds a section).
    `obj` itself is left unchanged. Raises ConfigError on an unknown path or bad value."""
    probs = _Problems()
    parts = path.split(".")
    tp = _path_type(type(obj), parts, "", probs)
    converted = _INVALID if tp is _INVALID else _convert(tp, value, path, probs)
    if probs.messages:
        raise ConfigError(probs.messages)
    new = copy.deepcopy(obj)
    target: Any = new
    for i, part in enumerate(parts[:-1]):
        target = target.get(part) if isinstance(target, dict) else getattr(target, part)
        if target is None:
            where = ".".join(parts[: i + 1])
            raise ConfigError([f"{where} is null; set the whole section instead"])
    if isinstance(target, dict):
        target[parts[-1]] = converted
    else:
        setattr(target, parts[-1], converted)
    return new
