"""Typed configs: dataclass defaults -> YAML file -> dotted ``key=value`` overrides.

Every stage has one dataclass config composed of per-component dataclasses. Field documentation is
the string literal written directly under a field (as in litgpt's ``args.py``); ``field_docs`` reads
those strings so the CLI can show them as help text.

Validation collects every problem before raising, and every message names the dotted key the user
typed: ``ConfigError("train.lr must be > 0, got -1")``. A dataclass may define ``check(self) -> list[str]``
returning problems with its own values (keys relative to itself); they are prefixed with the path.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """One or more config problems; the message lists all of them, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n  " + "\n  ".join(problems) if len(problems) > 1 else problems[0])


# ----------------------------------------------------------------------------------------------
# loading


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (),
                values: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then ``values`` (a flat dict of
    dotted keys, e.g. CLI options), then ``overrides`` (``"a.b=value"`` strings, parsed as YAML scalars).

    Raises ConfigError naming every unknown key and every bad value.
    """
    data: dict[str, Any] = {}
    problems: list[str] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file not found: {path}"])
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"config file {path} is not valid YAML: {e}"]) from e
        if not isinstance(loaded, dict):
            raise ConfigError([f"config file {path} must hold a mapping at the top level"])
        data = loaded
    for key, value in (values or {}).items():
        _set_dotted(data, key, value)
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r} must look like key=value")
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value)
    cfg = _build(cls, data, "", problems)
    if not problems:
        problems.extend(_check(cfg, ""))
    if problems:
        raise ConfigError(problems)
    return cfg


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _build(cls: type, data: dict, prefix: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            problems.append(f"unknown config key {dotted!r}{hint}")
            continue
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if isinstance(value, dict) and hasattr(typ, "select_variant"):
                try:  # a section whose dataclass depends on one of its keys (e.g. connector.name)
                    typ = typ.select_variant(value)
                except ValueError as e:
                    problems.append(f"{dotted}.{e}")
                    continue
            if not isinstance(value, dict):
                problems.append(f"{dotted} must be a mapping of {typ.__name__} fields, got {value!r}")
                continue
            kwargs[key] = _build(typ, value, dotted + ".", problems)
        else:
            ok, converted = _coerce(value, typ)
            if not ok:
                problems.append(f"{dotted} must be {_type_name(typ)}, got {value!r}")
                continue
            kwargs[key] = converted
    return cls(**kwargs)


def _coerce(value: Any, typ: Any) -> tuple[bool, Any]:
    """Return (ok, value converted to ``typ``) for the small set of types configs use."""
    origin = get_origin(typ)
    if typ is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        args = get_args(typ)
        if value is None:
            return (type(None) in args), None
        for arg in args:
            if arg is type(None):
                continue
            ok, converted = _coerce(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is Literal:
        return (value in get_args(typ)), value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        (inner, *_) = get_args(typ) or (Any,)
        out = []
        for v in value:
            ok, c = _coerce(v, inner)
            if not ok:
                return False, value
            out.append(c)
        return True, (tuple(out) if origin is tuple else out)
    if origin is dict or typ is dict:
        return isinstance(value, dict), value
    if typ is bool:
        return isinstance(value, bool), value
    if typ is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return True, str(value)
        return False, value
    return isinstance(value, typ), value


def _type_name(typ: Any) -> str:
    origin = get_origin(typ)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(typ))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(typ))
    if origin in (list, tuple):
        return f"a list of {_type_name(get_args(typ)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(typ, str(typ))


def _check(cfg: Any, prefix: str) -> list[str]:
    problems = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            problems.extend(_check(value, f"{prefix}{f.name}."))
    check = getattr(cfg, "check", None)
    if callable(check):
        problems.extend(f"{prefix}{p}" for p in check())
    return problems


# ----------------------------------------------------------------------------------------------
# saving and describing


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON serialisable) of a config dataclass."""
    return dataclasses.asdict(cfg)


def describe_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key (old -> new)`` for every (dotted, nested) key whose value differs between two config dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} ({a!r} -> {b!r})")
    return out


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (what actually ran, overrides applied)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> the docstring written right under it in the class body."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe_keys(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """Flatten a config class into (dotted key, default, doc) rows for help text."""
    rows = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            default = getattr(defaults, f.name)  # a section with variants: describe its default's fields
            rows.extend(describe_keys(type(default) if dataclasses.is_dataclass(default) else typ, f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", repr(getattr(defaults, f.name)), docs.get(f.name, "")))
    return rows
