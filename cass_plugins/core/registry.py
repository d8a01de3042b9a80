"""The registry of baselines, components and presets — filled only through the ``cass_register`` hook.

Built-in plugins and third-party ones register the same way: a module with ``@hookimpl def
cass_register(registry)``. The built-ins are named here as module strings (:data:`BUILTIN_PLUGINS`) and imported
on first use, third-party ones come from the ``cass_plugins`` entry-point group; both go through one pluggy plugin
manager. This module imports none of them, so the core never depends on the adapters (pytest loads its own
built-in plugins the same way).
"""
from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .hookspecs import make_plugin_manager
from .settings import Settings

if TYPE_CHECKING:  # pragma: no cover
    from .baseline import Baseline
    from .config import Config

__all__ = ["ComponentSpec", "Preset", "Registry", "REGISTRY", "BUILTIN_PLUGINS", "ENTRY_POINT_GROUP", "PluginLoadError"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "cass_plugins"

#: Built-in plugin modules, loaded by name through the same plugin manager as the entry-point plugins.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "cass_plugins.cass.plugin",
    "cass_plugins.adapters.naclip",
    "cass_plugins.adapters.sclip",
    "cass_plugins.adapters.clearclip",
    "cass_plugins.adapters.vanilla",
    "cass_plugins.adapters.proxyclip",
    "cass_plugins.adapters.cdam",
    "cass_plugins.trident.plugin",
)


class PluginLoadError(ImportError):
    """A plugin module (built-in or entry point) could not be imported or registered."""


@dataclass(frozen=True)
class ComponentSpec:
    """A named component: its settings, how to build its plugin for a patch, and what it needs.

    Attributes:
        name: the name users switch it on with (``components=[name]``) and the prefix of its settings
            (``--set name.key=value``).
        config_class: its :class:`~cass_plugins.core.settings.Settings` section (defaults + validation).
        factory: ``factory(settings, runtime) -> plugin``: the pluggy plugin installed in a patch;
            ``runtime`` is the :class:`~cass_plugins.core.patch.PatchRuntime` (the VFM runner, the model access).
        summary: one line for listings and errors.
        stage: ``"block"`` for components that edit the last block (registered before user plugins) or
            ``"text"`` for the text/logit side (registered after them), which fixes the hook call order.
        needs_vfm: the component cannot run without a VFM.
        needs_sam: the component reads SAM (``ctx.sam`` of the image-level hooks); the pipeline then needs a SAM
            model and encodes each image once for all such components.
        needs_prior: the component reads the presence prior (``ctx.prior`` of the text hooks); the patch then
            computes it, once per image (:meth:`~cass_plugins.core.patch.PatchHandle.logits`).
        check: ``check(config)`` raises ValueError for a configuration it cannot run in (e.g. a baseline without
            an attention graph); called when the configuration is resolved, before any model loads.
        baseline_settings: values it imposes on the baseline's settings when switched on (e.g. spectral
            distillation drops CLS from the patch attention), applied where the baseline has that setting.
        legacy_toggle: the flat boolean key of configurations before 0.2 (``presence_prior=False``).
        legacy_keys: flat keys of configurations before 0.2 → this section's field names.
    """

    name: str
    config_class: type[Settings]
    factory: Callable[[Any, Any], object]
    summary: str = ""
    stage: str = "text"
    needs_vfm: bool = False
    needs_sam: bool = False
    needs_prior: bool = False
    check: Callable[["Config"], None] | None = None
    baseline_settings: Mapping[str, Any] = field(default_factory=dict)
    legacy_toggle: str | None = None
    legacy_keys: Mapping[str, str] = field(default_factory=dict)

    @property
    def hooks(self) -> tuple[str, ...]:
        """The hook names the component's plugin implements (read from its class when the factory is one)."""
        target = self.factory if inspect.isclass(self.factory) else type(self.factory)
        return tuple(sorted(n for n in dir(target) if n.startswith("cass_") and n != "cass_register"))


@dataclass(frozen=True)
class Preset:
    """Named configuration values (any key :meth:`Config.replace` accepts) and per-dataset values.

    ``models`` names the models the method was published with where they differ from the command-line defaults
    (e.g. Trident: ``{"vfm": "vit_base_patch16_224.dino", "sam": "vit_b"}``); the CLIs use them unless a flag says
    otherwise.
    """

    name: str
    values: Mapping[str, Any]
    datasets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    summary: str = ""
    models: Mapping[str, str] = field(default_factory=dict)


class Registry:
    """Baselines, components and presets by name; filled by the ``cass_register`` hook of every plugin."""

    def __init__(self, builtins: tuple[str, ...] = BUILTIN_PLUGINS, group: str | None = ENTRY_POINT_GROUP) -> None:
        self._builtins, self._group = builtins, group
        self._loaded = False
        self._loading = False
        self.baselines: dict[str, type[Baseline]] = {}
        self.components: dict[str, ComponentSpec] = {}
        self.presets: dict[str, Preset] = {}
        self.sources: dict[str, str] = {}  # "component:name" -> plugin that registered it

    # -------------------------------------------------------------------------------------- filled by plugins
    def add_baseline(self, cls: "type[Baseline]") -> None:
        """Register a baseline class (a :class:`~cass_plugins.core.baseline.Baseline` subclass)."""
        self._claim("baseline", cls.name)
        cls.config_class.section = cls.name
        self.baselines[cls.name] = cls

    def add_component(self, spec: ComponentSpec) -> None:
        """Register a component."""
        if spec.stage not in ("block", "text"):
            raise ValueError(f"component {spec.name!r}: stage must be 'block' or 'text', got {spec.stage!r}")
        self._claim("component", spec.name)
        spec.config_class.section = spec.name
        self.components[spec.name] = spec

    def add_preset(self, preset: Preset) -> None:
        """Register a preset (validated when it is first resolved, once every plugin has registered)."""
        self._claim("preset", preset.name)
        self.presets[preset.name] = preset

    def _claim(self, kind: str, name: str) -> None:
        key = f"{kind}:{name}"
        if key in self.sources:
            raise ValueError(f"{kind} {name!r} is registered twice (by {self.sources[key]} and {self._current})")
        if kind in ("baseline", "component") and ("baseline:" + name in self.sources or "component:" + name in self.sources):
            raise ValueError(f"{name!r} is already registered as a baseline or component by another plugin")
        if name == "pipeline":
            raise ValueError("'pipeline' is the protocol settings' section; choose another name")
        self.sources[key] = self._current

    _current = "?"

    # -------------------------------------------------------------------------------------- lookups
    def baseline(self, name: str) -> "type[Baseline]":
        self.load()
        if name not in self.baselines:
            raise ValueError(f"unknown baseline {name!r}; available: {', '.join(sorted(self.baselines))}")
        return self.baselines[name]

    def component(self, name: str) -> ComponentSpec:
        self.load()
        if name not in self.components:
            raise ValueError(f"unknown component {name!r}; available: {', '.join(sorted(self.components))}")
        return self.components[name]

    def preset(self, name: str) -> Preset:
        self.load()
        if name not in self.presets:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(self.presets))}")
        return self.presets[name]

    # -------------------------------------------------------------------------------------- loading
    def load(self) -> None:
        """Load the built-in plugins and the entry-point plugins once, and let each register."""
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            pm = make_plugin_manager()
            for module_name in self._builtins:
                pm.register(_import_plugin(module_name, "built-in plugin"), name=module_name)
            if self._group is not None:
                for ep in entry_points(group=self._group):
                    if pm.has_plugin(ep.value) or ep.value in self._builtins:
                        continue
                    try:
                        plugin = ep.load()
                    except Exception as err:
                        raise PluginLoadError(
                            f"the cass_plugins entry point {ep.name!r} ({ep.value}) failed to load: "
                            f"{type(err).__name__}: {err}; uninstall or fix that package"
                        ) from err
                    pm.register(plugin, name=ep.value)
            # one plugin at a time through pluggy's hook caller, so a name clash can name both plugins
            plugins = pm.list_name_plugin()
            for name, plugin in plugins:
                others = [p for _, p in plugins if p is not plugin]
                self._current = name
                pm.subset_hook_caller("cass_register", remove_plugins=others)(registry=self)
            self._current = "?"
            self._loaded = True
        finally:
            self._loading = False

    def reset(self) -> None:
        """Forget everything; the next lookup loads the plugins again (for tests that install plugins)."""
        self.__init__(self._builtins, self._group)


def _import_plugin(name: str, what: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as err:
        raise PluginLoadError(f"{what} {name!r} failed to import: {type(err).__name__}: {err}") from err


REGISTRY = Registry()
