"""Registry: names to factories, one per kind of component (backbone, dataset, path, solver,
objective)."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fmkit.errors import FmkitError
from fmkit.options import check_options


@dataclass(frozen=True)
class Entry:
    """One registered component."""

    name: str  # the name users type, e.g. "unet"
    factory: Callable[..., Any]  # builds the component from keyword options
    plugin: str  # the plugin that registered it

    @property
    def description(self) -> str:
        """First line of the factory's docstring, or '' when it has none."""
        doc = inspect.getdoc(self.factory) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


def unknown_name_message(kind: str, name: str, available: list[str]) -> str:
    """`unknown backbone 'unte'; did you mean 'unet'? available: unet` (one line)."""
    close = difflib.get_close_matches(name, available, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ";"
    listing = ", ".join(sorted(available)) or "(none)"
    return f"unknown {kind} '{name}'{hint} available: {listing}"


class Registry:
    """Maps names to factories for one kind of component.

    Args:
        kind: singular noun used in error messages, e.g. "backbone".
        fixed: arguments fmkit passes every factory of this kind (never user options).
        optional: arguments fmkit passes only to factories that declare them by name (e.g.
            `data` for a backbone that can be conditioned).
    """

    def __init__(
        self, kind: str, fixed: tuple[str, ...] = (), optional: tuple[str, ...] = ()
    ) -> None:
        self.kind = kind
        self.fixed = fixed
        self.optional = optional
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, factory: Callable[..., Any], plugin: str = "<unknown>") -> None:
        """Register `factory` under `name`; a name taken by another plugin is an error."""
        if not isinstance(name, str) or not name:
            raise FmkitError(
                f"plugin {plugin} registered a {self.kind} with an invalid name {name!r}"
            )
        if not callable(factory):
            raise FmkitError(f"plugin {plugin} registered {self.kind} '{name}' with a non-callable")
        if name in self._entries:
            other = self._entries[name].plugin
            raise FmkitError(
                f"{self.kind} '{name}' is registered twice: by plugin {other} and by plugin {plugin}"
            )
        self._entries[name] = Entry(name, factory, plugin)

    def get(self, name: str) -> Entry:
        """The entry for `name`; an unknown name is an error listing what is available."""
        try:
            return self._entries[name]
        except KeyError:
            raise FmkitError(unknown_name_message(self.kind, name, self.names())) from None

    def build(self, name: str, options: Mapping[str, Any] | None = None, **given: Any) -> Any:
        """Call the factory of `name` with user `options` (validated) and what fmkit supplies.

        `given` holds the kind's fixed arguments (e.g. image_size, channels) and, for factories
        that declare them, its optional ones (e.g. data); users cannot set either as options.
        """
        entry = self.get(name)
        reserved = dict.fromkeys((*self.fixed, *self.optional, *given))
        checked = check_options(
            entry.factory, dict(options or {}), f"{self.kind} '{name}'", reserved
        )
        passed = {k: v for k, v in given.items() if k not in self.optional or self.accepts(name, k)}
        try:
            return entry.factory(**passed, **checked)
        except ValueError as exc:  # factories reject bad option values with ValueError
            raise FmkitError(f"{self.kind} '{name}': {exc}") from None

    def accepts(self, name: str, argument: str) -> bool:
        """Whether the factory of `name` declares a parameter called `argument`."""
        target = self.get(name).factory
        return argument in inspect.signature(target).parameters

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)
