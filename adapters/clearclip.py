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

from dataclasses import dataclass
from typing import Any

from cass_plugins.core.baseline import Baseline, BlockSettings
from cass_plugins.core.hookspecs import hookimpl
from cass_plugins.core.registry import Preset, Registry
from cass_plugins.core.settings import setting

__all__ = ["ClearCLIP", "ClearCLIPSettings", "PRESETS", "cass_register"]


@dataclass(frozen=True)
class ClearCLIPSettings(BlockSettings):
    """ClearCLIP's last block: q-q attention, no residual, no FFN (attn='vanilla': the shipped config)."""

    attn: str = setting("qq", choices=("qq", "vanilla", "csa", "identity"), doc="qq: softmax(s·QQᵀ) (the method)")


class ClearCLIP(Baseline):
    name = "clearclip"
    config_class = ClearCLIPSettings
    graph_fusion_note = (
        "fused into the q-q graph s·Q Qᵀ before the softmax (heads matched on the spectra of q, VFM keys "
        "range-matched to q); attn='vanilla' fuses into the q-k logits; attn='identity' (MaskCLIP) has no graph"
    )


# ClearCLIP's protocol (baselines.md §3): logit scale 50, 448/224 windows, short side 448 everywhere, no PAMR.
_PROTOCOL: dict[str, Any] = dict(
    baseline="clearclip", components=(), logit_scale=50.0, prob_thd=0.0, area_thd=None, crop=448,
    stride=224, short_side=448, mode="slide", pamr_steps=0, class_files="clearclip",
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

#: preset name -> (values, per-dataset values).
PRESETS: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {
    "clearclip": (_PROTOCOL, _DATASETS),
    "clearclip-shipped": ({**_PROTOCOL, "clearclip.attn": "vanilla"}, _DATASETS),
}


@hookimpl
def cass_register(registry: Registry) -> None:
    registry.add_baseline(ClearCLIP)
    for name, (values, datasets) in PRESETS.items():
        registry.add_preset(Preset(name, values, datasets))
