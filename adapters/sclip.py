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

from typing import Any

from .base import BASELINE_PROTOCOL_OFF, Baseline

__all__ = ["SCLIP", "PRESETS"]


class SCLIP(Baseline):
    name = "sclip"
    block_defaults = {"arch": "vanilla", "attn": "csa", "gaussian_std": None, "include_cls": True}
    attn_choices = ("csa",)
    spectral_note = (
        "fused into both CSA graphs: s·Q Qᵀ (heads matched on the spectra of q) and s·K Kᵀ (matched on k), "
        "each before its softmax"
    )


# SCLIP's protocol (baselines.md §3): logit scale 40, 224/112 windows, no PAMR; per-dataset overrides.
_PROTOCOL: dict[str, Any] = dict(
    SCLIP.block_defaults, baseline="sclip", logit_scale=40.0, prob_thd=0.0, area_thd=None, crop=224, stride=112,
    short_side=336, mode="slide", pamr_steps=0, pamr_dilations=(8, 16), class_files="sclip", **BASELINE_PROTOCOL_OFF,
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

#: preset name -> (values, per-dataset values), registered by :mod:`adapters`.
PRESETS: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {"sclip": (_PROTOCOL, _DATASETS)}
