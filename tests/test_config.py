"""Configuration: sections, dotted and flat keys, presets composing sections, the --set parser, a fresh registry."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from cass_plugins import ComponentSpec, Preset, Settings, SettingError, hookimpl, resolve_config, setting
from cass_plugins.core.config import parse_overrides
from cass_plugins.core.registry import Registry


def test_dotted_flat_and_section_dict_keys_reach_the_same_setting():
    a = resolve_config("cass-official", **{"spectral.lowrank": "exact", "ops.gamma": 0.3, "pipeline.crop": 336})
    b = resolve_config("cass-official", lowrank="exact", gamma=0.3, crop=336)  # flat keys of 0.1
    c = resolve_config("cass-official", spectral={"lowrank": "exact"}, ops={"gamma": 0.3}, pipeline={"crop": 336})
    assert a == b == c
    assert a["spectral"].lowrank == "exact" and a["ops"].gamma == 0.3 and a.pipeline.crop == 336
    assert a.lowrank == "exact" and a.gamma == 0.3  # flat reads of 0.1 still answer
    assert resolve_config("cass-official", cdam_alpha=3.0)["cdam"].alpha == 3.0  # legacy cdam_* keys
    assert resolve_config("proxyclip", proxy_beta=1.5)["proxyclip"].beta == 1.5


def test_component_toggles_and_component_lists():
    cfg = resolve_config("cass-official", presence_prior=False)  # the old toggle name of OPS
    assert cfg.components == ("spectral", "ota") and cfg.presence_prior is False and cfg.ota is True
    assert resolve_config("cass-official", ota=False).components == ("spectral", "ops")
    # the order of the list does not matter: components run in registry order
    assert resolve_config("sclip", components=["ota", "ops"]).components == ("ops", "ota")
    assert resolve_config("sclip", components="ops, ota").components == ("ops", "ota")


def test_naming_a_baseline_starts_from_its_published_settings():
    cfg = resolve_config("cass-official", baseline="sclip")
    assert cfg.block.arch == "vanilla" and cfg.block.attn == "csa"
    # CASS's spectral distillation drops CLS while it is on; switched off, SCLIP's own value comes back
    assert cfg.block.include_cls is False and cfg.sections["sclip"].include_cls is True
    assert cfg.replace(spectral=False).block.include_cls is True
    # NACLIP named explicitly: its own defaults, not the cass-official preset's edits
    assert resolve_config("cass-official", baseline="naclip", components=[]).block.include_cls is True
    assert resolve_config("cass-official", components=[]).block.include_cls is False  # the preset's


def test_presets_compose_sections_and_dataset_values():
    paper = resolve_config("cass-paper", "voc21")
    assert (paper.block.attn, paper.block.gaussian_std) == ("kk", None)
    assert paper["spectral"].pairing == "paper" and paper["spectral"].lowrank == "energy"
    assert (paper["ops"].gamma, paper["ota"].alpha, paper.pipeline.mode) == (0.10, 0.03, "whole")
    assert paper.pipeline.dataset == "voc21"
    assert resolve_config("cass-official", "voc20")["spectral"].eigenscaling is False
    assert resolve_config("cass-paper", "voc20")["spectral"].eigenscaling is True  # cass.md §6
    cdam = resolve_config("cdam-paper")
    assert cdam.baseline == "maskclip" and cdam.block.arch == "vanilla" and cdam.components == ("cdam",)
    assert cdam["cdam"].threshold_granularity == "image"


def test_describe_lists_every_section():
    d = resolve_config("cass-official").to_dict()
    assert set(d) >= {"baseline", "components", "pipeline", "naclip", "spectral", "ops", "ota", "cdam"}
    assert d["naclip"]["include_cls"] is False and d["components"] == ["spectral", "ops", "ota"]


@pytest.mark.parametrize("items,expected", [
    (["ops.gamma=0.25"], {"ops.gamma": 0.25}),
    (["gamma=0.25"], {"ops.gamma": 0.25}),
    (["lowrank=none"], {"spectral.lowrank": None}),
    (["spectral.eigenscaling=off"], {"spectral.eigenscaling": False}),
    (["pamr_dilations=4,8"], {"pipeline.pamr_dilations": (4, 8)}),
    (["area_thd=null"], {"pipeline.area_thd": None}),
    (["spectral.rank=7"], {"spectral.rank": 7}),
    (["matching=3,2,1,0"], {"spectral.matching": (3, 2, 1, 0)}),
    (["matching=[[0,1,2,3],[3,2,1,0]]"], {"spectral.matching": ((0, 1, 2, 3), (3, 2, 1, 0))}),
    (["matching=similar"], {"spectral.matching": "similar"}),
    (["spectral=false"], {"spectral": False}),
    (["components=ops,ota"], {"components": ["ops", "ota"]}),
])
def test_set_values_are_typed_by_their_setting(items, expected):
    assert parse_overrides(items, resolve_config("cass-official")) == expected


@pytest.mark.parametrize("items,match", [
    (["gamma=abc"], r"ops\.gamma='abc': expected a number"),
    (["rank=abc"], r"spectral\.rank='abc': expected an integer"),
    (["eigenscaling=maybe"], r"spectral\.eigenscaling='maybe': expected true/false"),
    (["gama=0.1"], r"unknown configuration key 'gama'"),
    (["gamma"], "KEY=VALUE"),
    (["gaussian_std=3"], None),  # valid: the active baseline (NACLIP) has it
])
def test_set_errors_name_the_key(items, match):
    cfg = resolve_config("cass-official")
    if match is None:
        assert parse_overrides(items, cfg) == {"naclip.gaussian_std": 3.0}
        with pytest.raises(SettingError, match="it is a setting of baseline naclip"):
            parse_overrides(items, resolve_config("sclip"))
        return
    with pytest.raises(SettingError, match=match):
        parse_overrides(items, cfg)


# ------------------------------------------------------------------------------------------ a registry of one's own
@dataclass(frozen=True)
class _Loud(Settings):
    alpha: float = setting(0.5, range=(0.0, 1.0))


@dataclass(frozen=True)
class _Quiet(Settings):
    alpha: float = setting(0.1, range=(0.0, 1.0))


class _Plugin:
    def __init__(self, config, runtime=None):
        self.config = config


class _Module:
    """A plugin module registering two components with a field of the same name, and a preset."""

    @staticmethod
    @hookimpl
    def cass_register(registry):
        registry.add_component(ComponentSpec("loud", _Loud, _Plugin))
        registry.add_component(ComponentSpec("quiet", _Quiet, _Plugin))
        registry.add_preset(Preset("toy", {"baseline": "naclip", "components": ("loud",), "loud.alpha": 0.75}))


def _registry() -> Registry:
    import sys
    import types

    module = types.ModuleType("_toy_components")
    module.cass_register = _Module.cass_register
    sys.modules["_toy_components"] = module
    return Registry(builtins=("cass_plugins.adapters.naclip", "_toy_components"), group=None)


def test_ambiguous_flat_keys_are_refused_with_the_dotted_choices():
    import sys

    registry = _registry()
    cfg = resolve_config("toy", registry=registry)
    assert cfg.components == ("loud",)
    with pytest.raises(SettingError, match=r"'alpha' is ambiguous: use one of .*loud\.alpha.*quiet\.alpha"):
        resolve_config("toy", registry=registry, alpha=0.2)
    import types

    again = types.ModuleType("_toy_components_again")
    again.cass_register = _Module.cass_register
    sys.modules["_toy_components_again"] = again
    twice = Registry(builtins=("cass_plugins.adapters.naclip", "_toy_components", "_toy_components_again"), group=None)
    with pytest.raises(ValueError, match=r"component 'loud' is registered twice \(by _toy_components and "
                                         r"_toy_components_again\)"):
        twice.load()


def test_legacy_flat_key_of_a_switched_off_component_is_refused_where_it_would_miss():
    # under cdam-* presets OTA is off and CDAM has an alpha: "alpha" would silently set OTA's
    with pytest.raises(SettingError, match=r"'alpha' is ambiguous here: ota\.alpha .*cdam\.alpha"):
        resolve_config("cdam-sclip", alpha=0.5)
    assert resolve_config("cdam-sclip", **{"cdam.alpha": 0.5})["cdam"].alpha == 0.5
    with pytest.raises(SettingError, match=r"'gamma' is ambiguous here: ops\.gamma .*proxyclip\.gamma"):
        resolve_config("proxyclip", gamma=2.0)
    assert resolve_config("cass-official", alpha=0.5)["ota"].alpha == 0.5  # OTA on: the 0.1 meaning
