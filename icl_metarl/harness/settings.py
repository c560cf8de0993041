"""Settings dataclasses -> command-line flags and JSON sections: the one path from a config to a user.

A settings dataclass is the single source of truth: each field's type, default and the one-line string
under it (its docstring) become the flag, its parsing and its help; the same types check the values of a
JSON configuration file. Not for: validating what a value means (each config's own ``check``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import types
import typing
from functools import lru_cache

from icl_metarl.harness.errors import UsageError, choice_error

#: field metadata key: extra command-line spellings of a field (e.g. {"flags": ("-K",)})
FLAGS = "flags"
#: field metadata key: a function parsing one command-line token into one element (e.g. "0.1" -> (0, 1))
PARSE = "parse"
#: field metadata key: a string field that a JSON file may also give as an integer (a task pool's count)
COUNT_OK = "count_ok"
#: field metadata key: False for a sequence flag whose values hold commas themselves (ENV=x,y,z): only
#: spaces separate its values
COMMAS = "commas"


@lru_cache(maxsize=None)
def _classes(filename: str) -> dict[str, ast.ClassDef]:
    """Every class statement of a source file by qualified name, the file parsed once (``--help`` reads many)."""
    found: dict[str, ast.ClassDef] = {}

    def visit(body, prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                found[prefix + node.name] = node
                visit(node.body, f"{prefix}{node.name}.")

    with open(filename, encoding="utf-8") as f:
        visit(ast.parse(f.read()).body, "")
    return found


@lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """The string literal under each field of the dataclass ``cls`` (and its bases), read from the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = _classes(inspect.getsourcefile(klass))[klass.__qualname__].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _kind(tp) -> tuple[type, bool, bool]:
    """(element type, is a sequence, may be None) of a field's type annotation."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return (args[0] if args else str), True, optional
    return tp, False, optional


def field_types(cls) -> dict[str, tuple[type, bool, bool]]:
    """Per field of the dataclass ``cls``: (element type, is a sequence, may be None)."""
    hints = typing.get_type_hints(cls)
    return {f.name: _kind(hints[f.name]) for f in dataclasses.fields(cls)}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _scalar(kind: type):
    """An argparse ``type`` for one value; task pools and the like stay strings."""
    if kind is int:
        return int
    if kind is float:
        return float
    return str


def add_arguments(parser: argparse.ArgumentParser, cls, skip=(), required=(), defaults: dict | None = None) -> None:
    """A ``--flag`` per field of ``cls`` (underscores become dashes), its docstring as help.

    Booleans get ``--x/--no-x``; sequences take several values; ``X | None`` fields accept ``none``.
    ``skip``: fields set by the caller, not the user; ``required``: fields without a usable default;
    ``defaults``: other defaults than the dataclass's (e.g. a study's preset), shown in the help.
    """
    docs = field_docs(cls)
    kinds = field_types(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, many, optional = kinds[f.name]
        default = defaults.get(f.name, _default(f))
        names = ["--" + f.name.replace("_", "-"), *f.metadata.get(FLAGS, ())]
        help_ = docs.get(f.name, "").replace("%", "%%")
        if f.name in required:
            parser.add_argument(*names, dest=f.name, required=True, nargs="+" if many else None,
                                type=_scalar(kind), help=help_)
        elif kind is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_)
        elif many:  # several values, spaces or commas between them (--hidden 64 64 or 64,64)
            commas = f.metadata.get(COMMAS, True)
            shown = (",".join if commas else " ".join)(map(str, default)) if default is not None else default
            parser.add_argument(*names, dest=f.name, default=default, nargs="+", metavar=f.name.upper(),
                                action=_split_at_commas(f.metadata.get(PARSE, _scalar(kind)), commas),
                                help=f"{help_} (default: {shown})")
        else:
            convert = f.metadata.get(PARSE, _scalar(kind))
            parser.add_argument(*names, dest=f.name, default=default, metavar=f.name.upper(),
                                type=_optional(convert) if optional else convert, help=f"{help_} (default: {default})")


def _split_at_commas(convert, commas: bool = True):
    """An argparse action for a sequence flag: every token split at commas (unless ``commas`` is False),
    each part converted."""

    class SplitAtCommas(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            items = []
            for part in (p.strip() for token in values for p in (str(token).split(",") if commas else [token])):
                if part:
                    try:
                        items.append(convert(part))
                    except (TypeError, ValueError) as e:
                        raise argparse.ArgumentError(self, f"invalid value {part!r}: {e}") from None
            setattr(namespace, self.dest, tuple(items))

    return SplitAtCommas


def _optional(convert):
    def parse(text: str):
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = convert.__name__
    return parse


def from_args(cls, args: argparse.Namespace, **fixed):
    """An instance of ``cls`` from parsed flags (fields absent from ``args`` keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    for name, (_, many, _) in field_types(cls).items():
        if many and isinstance(values.get(name), list):
            values[name] = tuple(values[name])
    values.update(fixed)
    return cls(**values)


def check_value(where: str, value, kind: type, many: bool, optional: bool, count_ok: bool = False):
    """A JSON value checked against a field's type (lists become tuples); else a UsageError naming it.
    ``count_ok``: a string field that also takes an integer (``COUNT_OK``)."""
    if value is None and optional:
        return None
    if many:
        if not isinstance(value, list):
            raise UsageError(f"{where} must be a list, got {value!r}")
        return tuple(check_value(where, v, kind, False, False) for v in value)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: is_int,
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str) or (count_ok and is_int),
    }.get(kind, lambda v: True)(value)
    if not ok:
        also = " or an integer" if count_ok else ""
        raise UsageError(f"{where} must be a {kind.__name__}{also}{' or null' if optional else ''}, got {value!r}")
    return value


def from_dict(cls, values: dict, where: str, base=None, owned=()):
    """``base`` (default: ``cls()``) with the JSON object ``values`` on top, every key and type checked.

    ``owned``: fields a caller sets itself; naming one is an error that says so.
    """
    if not isinstance(values, dict):
        raise UsageError(f"section {where!r} must be a JSON object, got {values!r}")
    base = base if base is not None else cls()
    kinds = field_types(cls)
    count_ok = {f.name for f in dataclasses.fields(cls) if f.metadata.get(COUNT_OK)}
    changes = {}
    for key, value in values.items():
        if key in owned:
            raise UsageError(f"{where}.{key} is set by the study (its top-level settings or directory layout); remove it")
        if key not in kinds:
            raise choice_error(f"setting in {where}:", key, [k for k in kinds if k not in owned])
        changes[key] = check_value(f"{where}.{key}", value, *kinds[key], count_ok=key in count_ok)
    try:
        return dataclasses.replace(base, **changes)
    except TypeError as e:
        raise UsageError(f"{where}: {e}") from None
