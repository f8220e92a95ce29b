"""Plugin options: `KEY=VALUE` strings from the CLI, parsed without eval and checked against
the factory's signature and type annotations."""

from __future__ import annotations

import ast
import difflib
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fmkit.errors import FmkitError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def parse_value(text: str) -> Any:
    """A Python literal (`3`, `1e-4`, `(1, 2, 2)`, `'x'`, `None`) or, failing that, the text.

    `ast.literal_eval` never runs code, so `--backbone-opt x=__import__('os')` stays a string.
    """
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def format_options(options: dict[str, Any]) -> str:
    """`{"rtol": 1e-05, "steps": 20}` as a user types them: "rtol=1e-05 steps=20" ("" if
    none), the inverse of `parse_options` for printing."""
    return " ".join(f"{key}={value}" for key, value in sorted(options.items()))


def parse_options(pairs: Iterable[str], flag: str = "--opt") -> dict[str, Any]:
    """Turn `["steps=10", "rtol=1e-5"]` into `{"steps": 10, "rtol": 1e-5}`.

    Args:
        pairs: the repeated `KEY=VALUE` strings.
        flag: the CLI flag they came from, for error messages.
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise FmkitError(f"{flag} expects KEY=VALUE, got {pair!r}")
        options[key] = parse_value(value)
    return options


def _signature(factory: Callable[..., Any]) -> tuple[inspect.Signature, dict[str, Any]]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: check names only
        hints = {}
    return inspect.signature(factory), hints


def check_options(
    factory: Callable[..., Any],
    options: Mapping[str, Any],
    what: str,
    fixed: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate `options` for `factory` and return them converted to the annotated types.

    Args:
        factory: the component factory whose keyword parameters are the valid options.
        options: user-supplied values (already parsed).
        what: e.g. "backbone 'unet'", for error messages.
        fixed: arguments fmkit passes itself; setting them through options is an error.
    """
    fixed = fixed or {}
    sig, hints = _signature(factory)
    params = {
        n: p
        for n, p in sig.parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n != "self"
    }
    open_ended = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    valid = [n for n in params if n not in fixed]
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if key in fixed:
            raise FmkitError(f"option '{key}' of {what} is set by fmkit itself, not by an option")
        if key not in params:
            if open_ended:
                checked[key] = value
                continue
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ";"
            raise FmkitError(
                f"unknown option '{key}' for {what}{hint} valid options: {', '.join(valid) or '(none)'}"
            )
        annotation = hints.get(key, Any)
        try:
            checked[key] = conform(value, annotation)
        except TypeError:
            raise FmkitError(
                f"option '{key}' of {what} expects {type_name(annotation)}, got {value!r}"
            ) from None
    return checked


def describe_options(factory: Callable[..., Any], skip: Iterable[str] = ()) -> list[str]:
    """One line per keyword option of `factory`: `name: type = default`."""
    sig, hints = _signature(factory)
    lines = []
    for name, p in sig.parameters.items():
        if name in skip or name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        line = f"{name}: {type_name(hints.get(name, Any))}"
        lines.append(line if p.default is p.empty else f"{line} = {p.default!r}")
    return lines


def type_name(annotation: Any) -> str:
    """Readable name of an annotation: `int`, `tuple[int, ...]`, `'a' | 'b'`."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    return str(annotation).replace("typing.", "")


def conform(value: Any, annotation: Any) -> Any:
    """Return `value` as `annotation` (int->float, 'true'->True, 16->(16,)); TypeError if it
    cannot be."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        for arm in args:
            try:
                return conform(value, arm)
            except TypeError:
                continue
        raise TypeError(value)
    if origin is typing.Literal:
        if value in args:
            return value
        raise TypeError(value)
    if annotation is type(None):
        if value is None:
            return None
        raise TypeError(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise TypeError(value)
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(value)
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(value)
    if annotation is str:
        # `split=train` arrives as text; `name=123` is not a name.
        if isinstance(value, str):
            return value
        raise TypeError(value)
    if origin in (tuple, list) or annotation in (tuple, list):
        if isinstance(value, str) and "," in value:  # `attributes=Smiling,Eyeglasses`
            value = tuple(part.strip() for part in value.split(","))
        items = value if isinstance(value, (tuple, list)) else (value,)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise TypeError(value)
            conv = [conform(v, a) for v, a in zip(items, args, strict=True)]
        else:
            arm = args[0] if args else Any
            conv = [conform(v, arm) for v in items]
        return tuple(conv) if (origin or annotation) is tuple else list(conv)
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise TypeError(value)
    return value  # annotations we do not understand are not enforced
