"""SCLIP (baselines.md §1.2): correlative self-attention, residual and FFN kept.

``A_j = softmax(s·Q_j Q_jᵀ) + softmax(s·K_j K_jᵀ)``: two softmaxes **summed** (rows sum to 2), CLS in both rows and
columns, no mask; then ``Z = X + out_proj(A·V)``, ``Z = Z + mlp(ln_2(Z))`` (Q1, reproduced). ``arch='reduced'``
(``Z = out_proj(A·V)``) is ClearCLIP's ``model_type='SCLIP'`` with its default ``ignore_residual=True``.

With CASS's spectral distillation the VFM graph is fused into **both** graphs, each with its own head matching:
the q-q graph against the spectra (and value range) of q, the k-k graph against those of k. CLS then leaves the
attention (the VFM graph covers patches only); the residual and FFN still run on the patch rows.

Quirks: Q4 (F) SCLIP overwrites ``seg_logits`` per image (batch > 1 breaks) - not reproduced, the pipeline is
per image; Q14 (R) ``area_thd`` relative to the non-class-0 pixel count - a pipeline setting of the preset.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cass_plugins.core.baseline import Baseline, BlockSettings
from cass_plugins.core.hookspecs import hookimpl
from cass_plugins.core.registry import Preset, Registry
from cass_plugins.core.settings import setting

__all__ = ["SCLIP", "SCLIPSettings", "PRESETS", "cass_register"]


@dataclass(frozen=True)
class SCLIPSettings(BlockSettings):
    """SCLIP's last block: correlative self-attention, residual and FFN kept."""

    arch: str = setting("vanilla", choices=("reduced", "vanilla"), doc="SCLIP keeps residual + FFN ('vanilla')")
    attn: str = setting("csa", choices=("csa",), doc="softmax(s·QQᵀ) + softmax(s·KKᵀ)")


class SCLIP(Baseline):
    name = "sclip"
    config_class = SCLIPSettings
    graph_fusion_note = (
        "fused into both CSA graphs: s·Q Qᵀ (heads matched on the spectra of q) and s·K Kᵀ (matched on k), "
        "each before its softmax"
    )


# SCLIP's protocol (baselines.md §3): logit scale 40, 224/112 windows, no PAMR; per-dataset overrides.
_PROTOCOL: dict[str, Any] = dict(
    baseline="sclip", components=(), logit_scale=40.0, prob_thd=0.0, area_thd=None, crop=224, stride=112,
    short_side=336, mode="slide", pamr_steps=0, pamr_dilations=(8, 16), class_files="sclip",
)
_DATASETS: dict[str, dict[str, Any]] = {
    "voc21": dict(short_side=336, logit_scale=65.0, prob_thd=0.1, area_thd=0.1),
    "context60": dict(short_side=336, logit_scale=50.0, prob_thd=0.1),
    "coco_object": dict(short_side=336, logit_scale=50.0, prob_thd=0.1),
    "voc20": dict(short_side=336),
    "cityscapes": dict(short_side=560),
    "context59": dict(short_side=336),
    "ade20k": dict(short_side=336),
    "coco_stuff164k": dict(short_side=448),
}

#: preset name -> (values, per-dataset values).
PRESETS: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {"sclip": (_PROTOCOL, _DATASETS)}


@hookimpl
def cass_register(registry: Registry) -> None:
    registry.add_baseline(SCLIP)
    for name, (values, datasets) in PRESETS.items():
        registry.add_preset(Preset(name, values, datasets))
