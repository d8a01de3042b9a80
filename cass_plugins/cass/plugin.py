"""CASS's built-in plugin: registers its three components and its presets through ``cass_register``.

Components (CASS, Kim et al. CVPR 2025; authors' ``cass.py``; docs/spec/cass.md):

- ``spectral`` — spectral object-level context distillation in the last block (§3.2, Eq. 3–7):
  :class:`~cass_plugins.cass.distillation.SpectralAttentionHook`, settings
  :class:`~cass_plugins.cass.distillation.SpectralConfig`;
- ``ops`` — the object presence prior (§3.3, Eq. 8–9): :class:`~cass_plugins.cass.prior.PresencePriorPlugin`,
  settings :class:`~cass_plugins.cass.prior.PresencePriorConfig`;
- ``ota`` — object-guided text embedding adjustment (§3.3, Eq. 10–11):
  :class:`~cass_plugins.cass.ota.TextAdjusterPlugin`, settings :class:`~cass_plugins.cass.ota.OTAConfig`.

Presets ``cass-official`` (what the authors' code computes; the published numbers) and ``cass-paper`` (the equations
as printed) with the per-dataset values of docs/spec/cass.md §7.
"""
from __future__ import annotations

from typing import Any

from cass_plugins.core.hookspecs import hookimpl
from cass_plugins.core.registry import ComponentSpec, Preset, Registry

from .distillation import SPECTRAL_LEGACY_KEYS, SpectralAttentionHook, SpectralConfig, check_spectral
from .ota import OTA_LEGACY_KEYS, OTAConfig, TextAdjusterPlugin
from .prior import PRIOR_LEGACY_KEYS, PresencePriorConfig, PresencePriorPlugin

__all__ = ["COMPONENTS", "PRESETS", "cass_register"]

COMPONENTS = (
    ComponentSpec(
        name="spectral", config_class=SpectralConfig, factory=SpectralAttentionHook, stage="block", needs_vfm=True,
        summary="CASS spectral distillation: the VFM's low-rank attention graph fused into CLIP's last block",
        check=check_spectral, baseline_settings={"include_cls": False}, legacy_toggle="spectral",
        legacy_keys=SPECTRAL_LEGACY_KEYS,
    ),
    ComponentSpec(
        name="ops", config_class=PresencePriorConfig, factory=PresencePriorPlugin, needs_prior=True,
        summary="CASS object presence prior: logits blended with the whole image's class similarity",
        legacy_toggle="presence_prior", legacy_keys=PRIOR_LEGACY_KEYS,
    ),
    ComponentSpec(
        name="ota", config_class=OTAConfig, factory=TextAdjusterPlugin, needs_prior=True,
        summary="CASS object-guided text adjustment: each cluster's likeliest class moved toward its top patches",
        legacy_toggle="ota", legacy_keys=OTA_LEGACY_KEYS,
    ),
)

_ALL = ("spectral", "ops", "ota")

# cass.md §6: cass-official is NACLIP's reduced block with CLS dropped and ω (std 5), randomized low rank 10, λ = 10,
# the official pairing; cass-paper follows the printed equations.
PRESETS: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {}

# Per-dataset values (cass.md §7). Keys are merged over the method preset.
_DATASETS: dict[str, dict[str, Any]] = {
    "voc21": {"ops.gamma": 0.10, "ota.alpha": 0.03, "ota.h_threshold": 0.10, "prob_thd": 0.1, "short_side": 336, "mode": "whole"},
    "voc20": {"ops.gamma": 0.40, "ota.alpha": 0.02, "ota.h_threshold": 0.10, "prob_thd": 0.0, "short_side": 336,
              "spectral.eigenscaling": False},
    "context60": {"ops.gamma": 0.25, "ota.alpha": 0.04, "ota.h_threshold": 0.09, "prob_thd": 0.1, "short_side": 336},
    "context59": {"ops.gamma": 0.25, "ota.alpha": 0.04, "ota.h_threshold": 0.09, "prob_thd": 0.0, "short_side": 336},
    "coco_object": {"ops.gamma": 0.25, "ota.alpha": 0.01, "ota.h_threshold": 0.10, "prob_thd": 0.1, "short_side": 336},
    "coco_stuff164k": {"ops.gamma": 0.20, "ota.alpha": 0.02, "ota.h_threshold": 0.02, "prob_thd": 0.0, "short_side": 336},
    "cityscapes": {"ops.gamma": 0.10, "ota.alpha": 0.03, "ota.h_threshold": 0.14, "prob_thd": 0.0, "short_side": 560,
                   "prior_source": "crop", "spectral.eigenscaling": False},
    "ade20k": {"ops.gamma": 0.30, "ota.alpha": 0.05, "ota.h_threshold": 0.06, "prob_thd": 0.0, "short_side": 336},
}

PRESETS["cass-official"] = (
    {"baseline": "naclip", "components": _ALL, "naclip.include_cls": False},
    _DATASETS,
)
PRESETS["cass-paper"] = (
    {
        "baseline": "naclip", "components": _ALL, "naclip.include_cls": False,
        "naclip.attn": "kk",  # Eq. 2 has no Gaussian window: NACLIP's key-key strategy without ω
        "naclip.gaussian_std": None,
        "spectral.lowrank": "energy", "spectral.fusion_lambda": 1.0, "spectral.pairing": "paper",
    },
    # cass-paper: eigenscaling is on for every dataset (cass.md §6); the other values are shared (§9)
    {name: {k: v for k, v in values.items() if k != "spectral.eigenscaling"} for name, values in _DATASETS.items()},
)


@hookimpl
def cass_register(registry: Registry) -> None:
    for spec in COMPONENTS:
        registry.add_component(spec)
    for name, (values, datasets) in PRESETS.items():
        registry.add_preset(Preset(name, values, datasets))
