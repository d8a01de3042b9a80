"""The resolved configuration: protocol settings, one baseline with its settings, and components with theirs.

:class:`Config` composes :class:`~cass_plugins.core.settings.Settings` sections: ``pipeline`` (the inference
protocol), the active baseline's section (named after it: ``naclip``, ``sclip`` ...) and one section per registered
component (``spectral``, ``ops``, ``ota``, ``cdam``, third-party ones), whether switched on or not, so presets can
set a component's values independently of switching it on.

Keys (the same everywhere: ``patch_clip(**overrides)``, ``Segmenter(**overrides)``, ``--set key=value``):

- dotted: ``spectral.lowrank``, ``cdam.alpha``, ``ops.gamma``, ``pipeline.crop``, ``naclip.gaussian_std``;
- ``baseline`` (name) and ``components`` (the names switched on);
- flat: a ``pipeline`` field (``crop``), the keys of versions before 0.2 (``lowrank``, ``gamma``, ``cdam_alpha``,
  ``presence_prior=False`` ...), or any field name that exactly one section has. An ambiguous flat key is refused
  with the dotted keys it could mean.

:func:`resolve_config` is the one resolver behind ``patch_clip``, ``Segmenter``, the CLIs, evaluation and ablation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .registry import REGISTRY, Registry
from .settings import Settings, SettingError, parse_setting, setting

__all__ = [
    "Config", "PipelineConfig", "resolve_config", "list_presets", "parse_overrides", "SettingError", "PIPELINE_KEYS",
]


def _positive_int_tuple(value: tuple[int, ...]) -> str | None:
    return None if value and all(v > 0 for v in value) else "give one or more positive integers"


@dataclass(frozen=True)
class PipelineConfig(Settings):
    """The inference protocol (CASS paper §4.1; docs/spec/protocol.md §6-8), shared by every method."""

    logit_scale: float = setting(40.0, range=(0.0, None), exclusive=True, doc="logits × this before the softmax")
    prob_thd: float = setting(0.0, range=(0.0, 1.0), doc="max probability below this → class 0 (background)")
    area_thd: float | None = setting(None, range=(0.0, 1.0), doc="SCLIP: classes below this area fraction → class 0")
    short_side: int = setting(336, range=(1, None), doc="resize the short side to this")
    max_long_side: int = setting(2048, range=(1, None), doc="cap on the long side after resizing")
    mode: str = setting(
        "slide", choices=("slide", "whole", "splice"),
        doc="sliding windows (logits averaged), one whole-image pass, or Trident's splice (window features "
        "averaged before the head, all windows of an image in one forward; docs/spec/trident.md §4)",
    )
    crop: int = setting(224, range=(1, None), doc="sliding-window size")
    stride: int = setting(112, range=(1, None), doc="sliding-window stride (≤ crop)")
    pamr_steps: int = setting(0, range=(0, None), doc="PAMR refinement iterations (0: off)")
    pamr_dilations: tuple[int, ...] = setting((8, 16), check=_positive_int_tuple, doc="PAMR dilations")
    window_batch: int = setting(8, range=(1, None), doc="windows per forward")
    prior_source: str = setting(
        "image", choices=("image", "crop"), doc="presence prior from the whole image (once) or each window's crop"
    )
    dataset: str | None = setting(None, doc="the dataset whose preset values were merged (informative)")
    class_files: str = setting("cass", doc="whose packaged class files a dataset vocabulary uses")

    section = "pipeline"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stride > self.crop:
            raise SettingError(
                f"pipeline.stride={self.stride} exceeds pipeline.crop={self.crop}: windows would leave gaps; "
                "use a stride ≤ the crop"
            )


PIPELINE_KEYS = PipelineConfig.field_names()

#: Flat keys of versions before 0.2 that name a pipeline setting under another section's prefix.
_LEGACY_TOP = {"baseline", "components"}


@dataclass(frozen=True, eq=False)
class Config:
    """A resolved, validated configuration (immutable; :meth:`replace` returns a new one).

    Attributes:
        baseline: the active baseline's name.
        components: the components switched on, in registration order of the patch.
        pipeline: the protocol settings.
        sections: every section by name: the baseline's and each registered component's.
    """

    baseline: str
    components: tuple[str, ...]
    pipeline: PipelineConfig
    sections: Mapping[str, Settings]
    registry: Registry = field(default=REGISTRY, repr=False)

    # ---------------------------------------------------------------------------------------------- access
    def __getitem__(self, name: str) -> Settings:
        if name == "pipeline":
            return self.pipeline
        if name == self.baseline:
            return self.block
        try:
            return self.sections[name]
        except KeyError:
            raise KeyError(f"no settings section {name!r}; sections: {', '.join(['pipeline', *self.sections])}") from None

    @property
    def block(self) -> Settings:
        """The active baseline's settings, with what switched-on components impose (spectral distillation drops
        CLS from the patch attention); derived, so switching the component off gives the baseline's own value back."""
        section = self.sections[self.baseline]
        imposed: dict[str, Any] = {}
        registry = _registry_of(self)
        for name in self.components:
            wanted = registry.components[name].baseline_settings
            imposed.update({k: v for k, v in wanted.items() if k in section.field_names()})
        if any(getattr(section, k) != v for k, v in imposed.items()):
            return section.replace(**imposed)
        return section

    def enabled(self, component: str) -> bool:
        return component in self.components

    def __getattr__(self, name: str) -> Any:
        # Flat reads of versions before 0.2 (``config.gamma``, ``config.spectral``): resolved like a flat key.
        if name.startswith("_"):
            raise AttributeError(name)
        registry = _registry_of(self)
        try:
            target = _flat_target(self, registry, name)
        except SettingError as err:
            raise AttributeError(str(err)) from None
        if target[0] == "toggle":
            return target[1] in self.components
        section, field_name = target[1], target[2]
        return getattr(self[section], field_name)

    # ---------------------------------------------------------------------------------------------- changes
    def replace(self, **overrides: Any) -> "Config":
        """A copy with ``overrides`` applied (keys as in the module docstring), validated.

        Raises:
            SettingError: unknown or ambiguous key, wrong type or range, or a combination a component refuses.
        """
        return _apply(self, overrides, _registry_of(self))

    def to_dict(self) -> dict[str, Any]:
        """Every setting, grouped by section (what ``--print-config`` prints)."""
        out: dict[str, Any] = {"baseline": self.baseline, "components": list(self.components)}
        out["pipeline"] = self.pipeline.to_dict()
        for name in self.sections:
            out[name] = self[name].to_dict()
        return out

    def describe(self) -> str:
        """The resolved configuration as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, default=_json_default)

    def __eq__(self, other: object) -> bool:
        # equal when every effective setting is (a value a component imposes equals the same value set directly)
        if not isinstance(other, Config):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Config(baseline={self.baseline!r}, components={self.components!r})"


def _json_default(value: Any) -> Any:
    if callable(value):
        return f"<callable {getattr(value, '__qualname__', repr(value))}>"
    return str(value)


def _registry_of(config: Config) -> Registry:
    return config.registry


# -------------------------------------------------------------------------------------------------- resolution
def _default_config(registry: Registry) -> Config:
    registry.load()
    sections: dict[str, Settings] = {"naclip": registry.baseline("naclip").config_class()}
    for name, spec in registry.components.items():
        sections[name] = spec.config_class()
    return Config(baseline="naclip", components=(), pipeline=PipelineConfig(), sections=sections, registry=registry)


def _flat_target(config: Config, registry: Registry, key: str) -> tuple[str, ...]:
    """Where a flat key points: ``("top", key)``, ``("toggle", component)`` or ``("field", section, field)``."""
    if key in _LEGACY_TOP:
        return ("top", key)
    if key in PIPELINE_KEYS:
        return ("field", "pipeline", key)
    for name, spec in registry.components.items():
        if key in (name, spec.legacy_toggle) and not _field_owners(config, registry, key):
            return ("toggle", name)
    for name, spec in registry.components.items():
        if key in spec.legacy_keys:
            # a key of 0.1 keeps its meaning, unless its component is off while the active baseline or a
            # switched-on component has a setting of that name: then it would silently miss what it seems to set
            live = [o for o in _field_owners(config, registry, key)
                    if o != name and (o == config.baseline or o in config.components)]
            if name not in config.components and live:
                raise SettingError(
                    f"{key!r} is ambiguous here: {name}.{key} (component {name!r} is off) or "
                    f"{', '.join(f'{o}.{key}' for o in live)}; use the dotted key"
                )
            return ("field", name, spec.legacy_keys[key])
    block = registry.baselines[config.baseline]
    if key in block.legacy_keys:
        return ("field", config.baseline, block.legacy_keys[key])
    owners = _field_owners(config, registry, key)
    if len(owners) == 1:
        return ("field", owners[0], key)
    if len(owners) > 1:
        raise SettingError(f"{key!r} is ambiguous: use one of {', '.join(f'{o}.{key}' for o in owners)}")
    hint = _legacy_hint(registry, key)
    raise SettingError(
        f"unknown configuration key {key!r}{hint}; keys are 'section.setting' "
        f"(sections: {', '.join(['pipeline', config.baseline, *registry.components])}) — "
        "`cass-segment --print-config` lists every one"
    )


def _field_owners(config: Config, registry: Registry, key: str) -> list[str]:
    owners = [config.baseline] if key in config.block.field_names() else []
    owners += [name for name, section in config.sections.items() if name != config.baseline and key in section.field_names()]
    return owners


def _legacy_hint(registry: Registry, key: str) -> str:
    """Name the baseline that has a setting the active one lacks (``gaussian_std`` → NACLIP)."""
    owners = [name for name, cls in registry.baselines.items() if key in cls.config_class.field_names() or key in cls.legacy_keys]
    if owners:
        return f" for the active baseline (it is a setting of baseline {', '.join(owners)})"
    return ""


def _split(config: Config, registry: Registry, key: str) -> tuple[str, ...]:
    if "." not in key:
        return _flat_target(config, registry, key)
    section, _, field_name = key.partition(".")
    if section != "pipeline" and section not in config.sections:
        if section in registry.baselines:
            raise SettingError(
                f"{key!r} is a setting of baseline {section!r}, but the active baseline is {config.baseline!r}; "
                f"pass baseline={section!r} (--baseline {section}) first"
            )
        raise SettingError(
            f"unknown section {section!r} in {key!r}; sections: {', '.join(['pipeline', *config.sections])}"
        )
    return ("field", section, field_name)


def _apply(config: Config, overrides: Mapping[str, Any], registry: Registry) -> Config:
    overrides = dict(overrides)
    baseline = config.baseline
    sections = dict(config.sections)
    components = list(config.components)
    pipeline_values: dict[str, Any] = {}
    # the baseline first: its settings are what the other keys edit
    if "baseline" in overrides:
        # naming a baseline starts from its own defaults (the baseline as published), even the active one
        baseline = overrides.pop("baseline")
        cls = registry.baseline(baseline)
        del sections[config.baseline]
        sections = {baseline: cls.config_class(), **sections}
    staged = Config(
        baseline=baseline, components=tuple(components), pipeline=config.pipeline, sections=sections, registry=registry
    )
    section_values: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if key == "components":
            components = _component_list(value, registry)
            continue
        if isinstance(value, Mapping) and "." not in key and (key in sections or key == "pipeline"):
            for k, v in value.items():  # a whole section as a dict: spectral={"lowrank": "exact"}
                _stage(section_values, pipeline_values, staged, registry, f"{key}.{k}", v)
            continue
        target = _split(staged, registry, key)
        if target[0] == "toggle":
            if not isinstance(value, bool):
                raise SettingError(f"{key}={value!r}: expected True or False (switches component {target[1]!r})")
            if value and target[1] not in components:
                components.append(target[1])
            elif not value and target[1] in components:
                components.remove(target[1])
            continue
        if target[0] == "top":
            raise SettingError(f"{key!r} cannot be set here")
        _stage(section_values, pipeline_values, staged, registry, f"{target[1]}.{target[2]}", value)

    pipeline = config.pipeline.replace(**pipeline_values) if pipeline_values else config.pipeline
    for name, values in section_values.items():
        sections[name] = sections[name].replace(**values)
    ordered = tuple(n for n in registry.components if n in components)
    new = Config(baseline=baseline, components=ordered, pipeline=pipeline, sections=sections, registry=registry)
    return _check(new, registry)


def _stage(
    section_values: dict[str, dict[str, Any]], pipeline_values: dict[str, Any], config: Config, registry: Registry,
    key: str, value: Any,
) -> None:
    section, _, field_name = key.partition(".")
    target = config[section] if section != "pipeline" else config.pipeline
    if field_name not in target.field_names():
        raise SettingError(
            f"unknown setting {key!r}; {section} has: {', '.join(target.field_names()) or '(no settings)'}"
        )
    if section == "pipeline":
        pipeline_values[field_name] = value
    else:
        section_values.setdefault(section, {})[field_name] = value


def _component_list(value: Any, registry: Registry) -> list[str]:
    if isinstance(value, str):
        value = [v.strip() for v in value.replace(";", ",").split(",") if v.strip()]
    names = list(value)
    unknown = [n for n in names if n not in registry.components]
    if unknown:
        raise SettingError(
            f"unknown component(s) {unknown}; available: {', '.join(sorted(registry.components))}"
        )
    return names


def _check(config: Config, registry: Registry) -> Config:
    """Cross-section rules: the baseline's and each switched-on component's refusals."""
    config.block  # what components impose must be valid for the baseline
    registry.baselines[config.baseline].check_config(config)
    prior_users = [n for n in config.components if registry.components[n].needs_prior]
    if config.pipeline.mode == "splice" and config.pipeline.prior_source == "crop" and prior_users:
        raise SettingError(
            f"{', '.join(prior_users)} with mode='splice' take the presence prior from the whole image (there is one "
            "spliced map, not one per crop): set prior_source='image'"
        )
    for name in config.components:
        check = registry.components[name].check
        if check is not None:
            check(config)
    return config


def resolve_config(
    preset: str | Config = "cass-official",
    dataset: str | None = None,
    *,
    baseline: str | None = None,
    components: Iterable[str] | None = None,
    registry: Registry | None = None,
    **overrides: Any,
) -> Config:
    """Preset → its values for ``dataset`` → ``baseline`` → ``components`` → ``overrides``, validated.

    Args:
        preset: a preset name or a resolved :class:`Config`.
        dataset: merge the preset's values for that benchmark.
        baseline: switch the last-block baseline (its settings start from the baseline's defaults).
        components: the components to switch on (the others are switched off); ``None`` keeps the preset's.
        registry: the registry to resolve names in (default: the global one).
        **overrides: any key (module docstring).

    Raises:
        SettingError: unknown preset, dataset, key or value, each message naming the valid choices.
    """
    registry = registry or REGISTRY
    registry.load()
    if isinstance(preset, Config):
        config = preset
        if dataset is not None:
            raise SettingError("dataset= needs a preset name (its per-dataset values), not a resolved Config")
    else:
        spec = registry.presets.get(preset)
        if spec is None:
            raise SettingError(f"unknown preset {preset!r}; available: {', '.join(sorted(registry.presets))}")
        config = _apply(_default_config(registry), _ordered(spec.values), registry)
        if dataset is not None:
            if dataset not in spec.datasets:
                known = ", ".join(sorted(spec.datasets)) or "none"
                raise SettingError(f"preset {preset!r} has no values for dataset {dataset!r}; datasets with values: {known}")
            config = _apply(config, {"pipeline.dataset": dataset, **spec.datasets[dataset]}, registry)
    # one step, checked once: a baseline that refuses the preset's components may come with components that fit
    changes = dict(overrides)
    if baseline is not None:
        changes["baseline"] = baseline
    if components is not None:
        changes["components"] = components if isinstance(components, str) else list(components)
    return _apply(config, changes, registry) if changes else config


def _ordered(values: Mapping[str, Any]) -> dict[str, Any]:
    """``baseline`` first (the other keys may edit its settings)."""
    return {**({"baseline": values["baseline"]} if "baseline" in values else {}), **values}


def list_presets(registry: Registry | None = None) -> list[str]:
    registry = registry or REGISTRY
    registry.load()
    return sorted(registry.presets)


def parse_overrides(items: Iterable[str], config: Config) -> dict[str, Any]:
    """``KEY=VALUE`` strings (``--set``) → typed overrides for ``config`` (values parsed by each field's type).

    Raises:
        SettingError: not ``key=value``, unknown key, or a value of the wrong type, naming the key.
    """
    registry = _registry_of(config)
    out: dict[str, Any] = {}
    staged = config
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SettingError(f"--set expects KEY=VALUE, got {item!r}")
        if key == "baseline":
            out["baseline"] = text.strip()
            # Staged only to resolve the later keys against the new baseline's section: without components, so that
            # a component of the preset that a later components=... drops cannot refuse the baseline here (the
            # caller validates the whole set, components included).
            staged = _apply(staged, {"baseline": out["baseline"], "components": []}, registry)
            continue
        if key == "components":
            out["components"] = _component_list(text, registry)
            continue
        target = _split(staged, registry, key)
        if target[0] == "toggle":
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise SettingError(f"{key}={text!r}: expected true or false (switches component {target[1]!r})")
            out[key] = low in ("true", "1", "yes", "on")
            continue
        section, field_name = target[1], target[2]
        cls = type(staged[section])
        out[f"{section}.{field_name}"] = parse_setting(cls, field_name, text)
    return out
