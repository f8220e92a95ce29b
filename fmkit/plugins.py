"""The plugin manager: built-in plugins and pip-installed ones (entry-point group `fmkit`).

Built-ins are ordinary plugin modules, registered the same way as entry points. Third-party
entry points are loaded one at a time, so a broken one is reported by distribution and skipped
while the rest of fmkit keeps working.

Environment:
    FMKIT_DISABLE_PLUGIN_AUTOLOAD=1  load only the built-in plugins.
    FMKIT_STRICT_PLUGINS=1           a plugin that fails to load or register is a fatal error.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from importlib.metadata import entry_points

import pluggy

from fmkit import hookspecs
from fmkit.errors import FmkitError
from fmkit.registry import Registry

logger = logging.getLogger("fmkit")

ENTRY_POINT_GROUP = "fmkit"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "fmkit_plugins.conditions",
    "fmkit_plugins.unet",
    "fmkit_plugins.paths",
    "fmkit_plugins.objectives",
    "fmkit_plugins.meanflow",
    "fmkit_plugins.distill",
    "fmkit_plugins.solvers",
    "fmkit_plugins.celeba",
    "fmkit_plugins.folder",
    "fmkit_plugins.imagenet",
    "fmkit_plugins.prepared",
    "fmkit_plugins.exporters",
    "fmkit_plugins.export_diffusers",
    "fmkit_plugins.metrics",
    "fmkit_plugins.spaces",
    "fmkit_plugins.autoencoder",
)


@dataclass(frozen=True)
class Kind:
    """One kind of component: what fmkit passes its factories (never user options)."""

    noun: str  # singular, for messages
    fixed: tuple[str, ...]  # passed to every factory
    optional: tuple[str, ...] = ()  # passed to factories that declare the parameter


# The one table of what fmkit passes each kind's factory; the registries, `fmkit show` and the
# docs test read it (docs/writing-plugins.md documents each).
KINDS: dict[str, Kind] = {
    "backbones": Kind("backbone", ("image_size", "channels"), ("data",)),
    "datasets": Kind("dataset", ("root", "image_size", "split"), ("condition",)),
    "paths": Kind("path", ()),
    "solvers": Kind("solver", ()),
    "objectives": Kind("objective", ("path",), ("teacher",)),
    "conditions": Kind("condition kind", ()),
    "exporters": Kind("exporter", ()),
    "metrics": Kind("metric", ()),
    "spaces": Kind("space", ()),
}


@dataclass(frozen=True)
class PluginInfo:
    """Where a registered plugin came from."""

    name: str  # plugin name in the manager (module name for built-ins, dist name otherwise)
    version: str  # version of the distribution that ships it
    distribution: str  # "fmkit" for built-ins


_registries: dict[str, Registry] = {}  # built from the plugins, until one comes or goes


class _PluginManager(pluggy.PluginManager):
    def register(self, plugin, name=None):
        _registries.clear()
        return super().register(plugin, name)

    def unregister(self, plugin=None, name=None):
        _registries.clear()
        return super().unregister(plugin, name)


pm = _PluginManager("fmkit")
pm.add_hookspecs(hookspecs)
_info: dict[str, PluginInfo] = {}
_loaded = False


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _fail(message: str) -> None:
    """A plugin misbehaved: fatal under FMKIT_STRICT_PLUGINS, otherwise one warning line."""
    if _flag("FMKIT_STRICT_PLUGINS"):
        raise FmkitError(message)
    logger.warning("fmkit: warning: %s", message)


def _fmkit_version() -> str:
    from fmkit import __version__

    return __version__


def load_plugins() -> pluggy.PluginManager:
    """Register the built-in plugins and every entry point of group `fmkit` (once)."""
    global _loaded
    if _loaded:
        return pm
    _loaded = True
    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)
        pm.register(module, name=module_name)
        _info[module_name] = PluginInfo(module_name, _fmkit_version(), "fmkit")
    if _flag("FMKIT_DISABLE_PLUGIN_AUTOLOAD"):
        return pm
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist_name = ep.dist.name if ep.dist else ep.name
        version = ep.dist.version if ep.dist else "unknown"
        if pm.get_plugin(dist_name) is not None or pm.is_blocked(dist_name):
            continue
        try:
            module = ep.load()
            pm.register(module, name=dist_name)
        except Exception as exc:  # any error in third-party import code
            _fail(f"skipping plugin {dist_name} {version}: {type(exc).__name__}: {exc}")
            continue
        _info[dist_name] = PluginInfo(dist_name, version, dist_name)
    return pm


def plugin_info(name: str) -> PluginInfo:
    """Version and distribution of a registered plugin (plugins registered by hand: 'unknown')."""
    return _info.get(name, PluginInfo(name, "unknown", "unknown"))


def component_info(kind: str, name: str) -> dict:
    """Which plugin, distribution and version provide the component `name` of `kind` (what
    a model spec records of each of its components)."""
    entry = registry(kind).get(name)
    info = plugin_info(entry.plugin)
    return {
        "name": name,
        "plugin": entry.plugin,
        "distribution": info.distribution,
        "version": info.version,
    }


def list_plugins() -> list[dict[str, object]]:
    """Every loaded plugin: name, version and the hooks it implements (built-ins first)."""
    manager = load_plugins()
    rows = []
    for name, plugin in manager.list_name_plugin():
        hooks = sorted(h.name for h in manager.get_hookcallers(plugin) or [])
        info = plugin_info(name)
        rows.append({"name": name, "version": info.version, "hooks": hooks})
    return rows


def registry(kind: str) -> Registry:
    """Build the registry `kind` (a key of KINDS, e.g. "backbones") from the hooks.

    Each plugin's hook is called on its own so that a duplicate name can name both plugins and
    a plugin whose hook raises is skipped alone.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown registry {kind!r}; expected one of {', '.join(KINDS)}")
    manager = load_plugins()
    if kind not in _registries:  # samplers and the training loop look kinds up per step
        _registries[kind] = _build(manager, kind)
    return _registries[kind]


def _build(manager: pluggy.PluginManager, kind: str) -> Registry:
    spec = KINDS[kind]
    reg = Registry(spec.noun, spec.fixed, spec.optional)
    caller = getattr(manager.hook, f"register_{kind}")
    # pluggy returns implementations last-registered-first; built-ins should come first.
    for impl in reversed(caller.get_hookimpls()):

        def register(name, factory, _plugin=impl.plugin_name):
            reg.add(name, factory, plugin=_plugin)

        try:
            impl.function(*[register for _ in impl.argnames])
        except FmkitError:
            raise
        except Exception as exc:
            _fail(
                f"plugin {impl.plugin_name} failed in register_{kind}: {type(exc).__name__}: {exc}"
            )
    return reg


def add_commands(cli: object) -> None:
    """Let plugins add click commands to the `fmkit` group."""
    manager = load_plugins()
    for impl in reversed(manager.hook.register_commands.get_hookimpls()):
        try:
            impl.function(*[cli for _ in impl.argnames])
        except Exception as exc:
            _fail(
                f"plugin {impl.plugin_name} failed in register_commands: {type(exc).__name__}: {exc}"
            )
