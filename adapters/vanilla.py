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

from dataclasses import dataclass
from typing import Any

from cass_plugins.core.baseline import Baseline, BlockSettings
from cass_plugins.core.hookspecs import hookimpl
from cass_plugins.core.registry import Preset, Registry
from cass_plugins.core.settings import setting

__all__ = ["Vanilla", "MaskCLIP", "VanillaSettings", "MaskCLIPSettings", "PRESETS", "cass_register"]


@dataclass(frozen=True)
class VanillaSettings(BlockSettings):
    """Plain CLIP's last block (attn='identity' makes it MaskCLIP, kept so the baselines table is one baseline)."""

    arch: str = setting("vanilla", choices=("reduced", "vanilla"), doc="'reduced': no residual/FFN")
    attn: str = setting("vanilla", choices=("vanilla", "identity"), doc="softmax(s·QKᵀ) or identity")


@dataclass(frozen=True)
class MaskCLIPSettings(BlockSettings):
    """MaskCLIP: identity attention, O = out_proj(V) (arch='vanilla': residual + FFN, the original MaskCLIP)."""

    attn: str = setting("identity", choices=("identity",), doc="each token attends to itself only")


class Vanilla(Baseline):
    name = "vanilla"
    config_class = VanillaSettings
    graph_fusion_note = (
        "fused into the q-k logits s·Q Kᵀ before the softmax (heads matched on the spectra of k); "
        "attn='identity' (MaskCLIP) has no graph"
    )


class MaskCLIP(Baseline):
    name = "maskclip"
    config_class = MaskCLIPSettings
    graph_fusion_note = (
        "MaskCLIP's attention is the identity (Z = out_proj(V)): there is no token-token graph to fuse the VFM "
        "graph into. OPS and OTA still apply; for spectral distillation pick a baseline with a graph "
        "(e.g. 'naclip', 'clearclip')"
    )

    @classmethod
    def has_fusable_graph(cls, settings: BlockSettings) -> bool:
        return False


# Plain CLIP runs in SCLIP's code (csa=False), so its preset uses SCLIP's protocol defaults and short sides, without
# the thresholds SCLIP tuned for its own method. MaskCLIP runs in ClearCLIP's code, so its presets use ClearCLIP's.
_SHORT_SIDES = {
    "voc21": 336, "context60": 336, "coco_object": 336, "voc20": 336, "cityscapes": 560, "context59": 336,
    "ade20k": 336, "coco_stuff164k": 448,
}
_VANILLA: dict[str, Any] = dict(
    baseline="vanilla", components=(), logit_scale=40.0, prob_thd=0.0, area_thd=None, crop=224, stride=112,
    short_side=336, mode="slide", pamr_steps=0, class_files="sclip",
)
_MASKCLIP: dict[str, Any] = dict(
    baseline="maskclip", components=(), logit_scale=50.0, prob_thd=0.0, area_thd=None, crop=448,
    stride=224, short_side=448, mode="slide", pamr_steps=0, class_files="clearclip",
)
_CLEARCLIP_DATASETS: dict[str, dict[str, Any]] = {
    name: ({"crop": 224} if name == "cityscapes" else {}) for name in _SHORT_SIDES
}

#: preset name -> (values, per-dataset values).
PRESETS: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {
    "vanilla": (_VANILLA, {name: {"short_side": s} for name, s in _SHORT_SIDES.items()}),
    "maskclip": (_MASKCLIP, _CLEARCLIP_DATASETS),
    "maskclip-original": ({**_MASKCLIP, "maskclip.arch": "vanilla"}, _CLEARCLIP_DATASETS),
}


@hookimpl
def cass_register(registry: Registry) -> None:
    registry.add_baseline(Vanilla)
    registry.add_baseline(MaskCLIP)
    for name, (values, datasets) in PRESETS.items():
        registry.add_preset(Preset(name, values, datasets))
