"""ClearCLIP (baselines.md §1.4): query-query attention, no residual, no FFN.

The method (``model_type='ClearCLIP'``, ``ignore_residual=True``): ``A_j = softmax(s·Q_j Q_jᵀ)``,
``Z = out_proj(A·V)``, CLS in the attention, then ``ln_post`` and ``proj`` (Q15, reproduced: ``ln_post`` sees the raw
attention output). This is ``attn='qq'``, ``arch='reduced'`` - the baseline's default and the ``clearclip`` preset.

Q6 (reproduced, both selectable): ClearCLIP's shipped ``configs/base_config.py`` runs ``model_type='vanilla'``,
i.e. **reduced vanilla** (``softmax(s·Q Kᵀ)``, ``Z = O``), not ClearCLIP; only its demo selects ``'ClearCLIP'``.
That behaviour is ``attn='vanilla'`` (preset ``clearclip-shipped``). ClearCLIP's other model types map to
``attn='csa'`` (``'SCLIP'``) and ``attn='identity'`` (``'MaskCLIP'``); ``ignore_residual=False`` is
``arch='vanilla'``.

Not supported: ``last_n_layers > 1`` (the sum over the last n blocks' outputs) raises a ValueError; GEM is out of
scope. Q4 (F) ``seg_logits`` overwritten per image - not reproduced.

Spectral distillation fuses the VFM graph into the q-q graph, with heads matched on the spectra of q and the VFM
keys range-matched to q (``attn='vanilla'``: into the q-k logits, matched on k; ``'identity'`` refuses).
"""
from __future__ import annotations

from typing import Any

from .base import BASELINE_PROTOCOL_OFF, Baseline

__all__ = ["ClearCLIP", "PRESETS"]


class ClearCLIP(Baseline):
    name = "clearclip"
    block_defaults = {"arch": "reduced", "attn": "qq", "gaussian_std": None, "include_cls": True}
    attn_choices = ("qq", "vanilla", "csa", "identity")
    spectral_note = (
        "fused into the q-q graph s·Q Qᵀ before the softmax (heads matched on the spectra of q, VFM keys "
        "range-matched to q); attn='vanilla' fuses into the q-k logits; attn='identity' (MaskCLIP) has no graph"
    )


# ClearCLIP's protocol (baselines.md §3): logit scale 50, 448/224 windows, short side 448 everywhere, no PAMR.
_PROTOCOL: dict[str, Any] = dict(
    ClearCLIP.block_defaults, baseline="clearclip", logit_scale=50.0, prob_thd=0.0, area_thd=None, crop=448,
    stride=224, short_side=448, mode="slide", pamr_steps=0, class_files="clearclip", **BASELINE_PROTOCOL_OFF,
)
_DATASETS: dict[str, dict[str, Any]] = {
    "voc21": dict(prob_thd=0.5),
    "context60": dict(prob_thd=0.15),
    "coco_object": dict(prob_thd=0.4),
    "voc20": {},
    "cityscapes": dict(crop=224),  # the stride stays 224
    "context59": {},
    "ade20k": {},
    "coco_stuff164k": {},
}

#: preset name -> (values, per-dataset values), registered by :mod:`adapters`.
PRESETS: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {
    "clearclip": (_PROTOCOL, _DATASETS),
    "clearclip-shipped": (dict(_PROTOCOL, attn="vanilla"), _DATASETS),
}
