"""Plain CLIP and MaskCLIP last blocks (baselines.md §1.1).

``vanilla``: ``A_j = softmax(s·Q_j K_jᵀ)``.

- ``arch='vanilla'`` is the plain CLIP block (``Z = X + O; Z + mlp(ln_2(Z))``), i.e. SCLIP's ``csa=False``,
  NACLIP's ``arch='vanilla', attn='vanilla'``, ClearCLIP's ``model_type='vanilla', ignore_residual=False``;
- ``arch='reduced'`` is "reduced vanilla" (``Z = O``): NACLIP's ``arch='reduced', attn='vanilla'`` and ClearCLIP's
  shipped ``base_config`` (also available as the ``clearclip-shipped`` preset).

``maskclip`` (``attn='identity'``, also accepted by ``vanilla``): identity attention, so ``O = out_proj(V)``; both
definitions are shipped:

- ``arch='reduced'`` (the baseline's default): MaskCLIP as ClearCLIP implements it (``model_type='MaskCLIP'``,
  ``ignore_residual=True``): ``Z = out_proj(V)``;
- ``arch='vanilla'``: MaskCLIP as originally defined (ClearCLIP with ``ignore_residual=False``, CLIP-DINOiser's
  MaskCLIP): ``Z = X + out_proj(V); Z + mlp(ln_2(Z))`` (preset ``maskclip-original``).

Spectral distillation: ``vanilla`` fuses the VFM graph into the q-k logits (heads matched on the keys' spectra,
as a q-k graph has no real spectrum); MaskCLIP has no attention graph at all and refuses it.
"""
from __future__ import annotations

from typing import Any

from .base import BASELINE_PROTOCOL_OFF, Baseline

__all__ = ["Vanilla", "MaskCLIP", "PRESETS"]


class Vanilla(Baseline):
    name = "vanilla"
    block_defaults = {"arch": "vanilla", "attn": "vanilla", "gaussian_std": None, "include_cls": True}
    # attn='identity' makes this MaskCLIP (same as baseline 'maskclip'); kept so the §1.1 table is one baseline.
    attn_choices = ("vanilla", "identity")
    spectral_note = (
        "fused into the q-k logits s·Q Kᵀ before the softmax (heads matched on the spectra of k); "
        "attn='identity' (MaskCLIP) has no graph"
    )


class MaskCLIP(Baseline):
    name = "maskclip"
    block_defaults = {"arch": "reduced", "attn": "identity", "gaussian_std": None, "include_cls": True}
    attn_choices = ("identity",)
    supports_spectral = False
    spectral_note = (
        "MaskCLIP's attention is the identity (Z = out_proj(V)): there is no token-token graph to fuse the VFM "
        "graph into. OPS and OTA still apply; for spectral distillation pick a baseline with a graph "
        "(e.g. 'naclip', 'clearclip')"
    )


# Plain CLIP runs in SCLIP's code (csa=False), so its preset uses SCLIP's protocol defaults and short sides, without
# the thresholds SCLIP tuned for its own method. MaskCLIP runs in ClearCLIP's code, so its presets use ClearCLIP's.
_SHORT_SIDES = {
    "voc21": 336, "context60": 336, "coco_object": 336, "voc20": 336, "cityscapes": 560, "context59": 336,
    "ade20k": 336, "coco_stuff164k": 448,
}
_VANILLA: dict[str, Any] = dict(
    Vanilla.block_defaults, baseline="vanilla", logit_scale=40.0, prob_thd=0.0, area_thd=None, crop=224, stride=112,
    short_side=336, mode="slide", pamr_steps=0, class_files="sclip", **BASELINE_PROTOCOL_OFF,
)
_MASKCLIP: dict[str, Any] = dict(
    MaskCLIP.block_defaults, baseline="maskclip", logit_scale=50.0, prob_thd=0.0, area_thd=None, crop=448,
    stride=224, short_side=448, mode="slide", pamr_steps=0, class_files="clearclip", **BASELINE_PROTOCOL_OFF,
)
_CLEARCLIP_DATASETS: dict[str, dict[str, Any]] = {
    name: ({"crop": 224} if name == "cityscapes" else {}) for name in _SHORT_SIDES
}

#: preset name -> (values, per-dataset values), registered by :mod:`adapters`.
PRESETS: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {
    "vanilla": (_VANILLA, {name: {"short_side": s} for name, s in _SHORT_SIDES.items()}),
    "maskclip": (_MASKCLIP, _CLEARCLIP_DATASETS),
    "maskclip-original": (dict(_MASKCLIP, arch="vanilla"), _CLEARCLIP_DATASETS),
}
