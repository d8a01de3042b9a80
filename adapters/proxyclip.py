"""ProxyCLIP (baselines.md §1.5): CLIP's values attended with a proxy attention built from VFM features.

For the last CLIP block only ``V`` is used (Q and K are ignored):

1. per head, ``V`` without CLS on the CLIP grid, bilinearly resized (``align_corners=False``) to the VFM grid
   ``(H', W')`` → ``V'`` with ``M = H'·W'`` tokens;
2. ``E`` = the VFM's final-norm last-block features of the same crop (``VFMRunner.features`` with ProxyCLIP's
   input rule, :data:`PROXYCLIP_VFM_INPUT`: CLIP normalisation undone with OpenAI CLIP's 0–1 constants, ImageNet
   normalisation applied, no resize); ``Ê`` = ``E`` L2-normalised over channels (eps 1e-12);
   ``S = Êᵀ Ê``; ``S' = γ·(S − β·mean(S))`` with β = 1.2, γ = 3.0 (``Config.proxy_beta`` / ``proxy_gamma``);
   ``S'[S' < 0] = −inf`` (exactly 0 is kept); ``A = softmax_row(S')``, shared by every head, no ``d^-0.5``;
3. ``Z = out_proj(concat_j(A·V'_j))``: no residual, no FFN, no CLS; ``M`` tokens on the VFM grid
   (``ctx.output_grid``), then ``ln_post`` and ``proj``.

Quirks (F = fixed here):

- Q9 (F) ProxyCLIP swaps the CLIP token grid (``(W//p, H//p)``) and takes both VFM grid sides from the height;
  here both grids are ``(rows, cols)`` of the actual crop, so non-square crops work. Square crops: identical.
- Q10 (F) ``mean(S)`` is one scalar over the whole batch in ProxyCLIP, coupling the images; here it is taken per
  image (over all M×M pairs, diagonal included). Identical at batch size 1, which is what ProxyCLIP runs.
- Q11 (F) When ``β·mean(S) ≥ 1`` a whole row of ``S'`` is −inf and the output is NaN; the diagonal is never masked
  (its value, ``γ·(S_ii − β·mean S)``, stays finite). Rows with any non-negative entry are unchanged, since
  ``S_ii = 1`` is then ≥ 0 after the shift.
- Q12 (F) ProxyCLIP registers a new (unused) VFM hook per call; the VFM runner here registers one, removed with the
  patch.
- ``S`` and the mask are computed in float32 (ProxyCLIP: fp16) so the −inf decisions do not depend on the model's
  half precision.
- VFM input: ProxyCLIP undoes the 0–255 CLIP normalisation of its crops with OpenAI CLIP's 0–1 constants
  (``myutils.py``), not the exact inverse CASS uses; the ~1e-5 difference flips entries of the hard ``S' < 0``
  mask, so the adapter sets ProxyCLIP's rule on the VFM runner it is given (reproduced, not fixed).

VFMs: DINO v1 and DINOv2 (with or without registers) as timm ViTs, features taken after the final norm with the
prefix tokens dropped, positional embedding interpolated the way each does it. SAM (neck features at 1024²) and MAE
(input resized to the crop, checkpoint pos-embed) need other feature pipelines and are refused with a clear error
(recognised by timm's pretrained tag / SAM's ``neck``).

CASS components: spectral distillation is refused (the proxy graph is already a VFM graph, the same for every head,
on the VFM grid; there is no CLIP attention graph left to distil into). OPS and OTA are pipeline-level and apply.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cass_plugins.core.baseline import Baseline, BlockSettings
from cass_plugins.core.hookspecs import BlockContext, hookimpl
from cass_plugins.core.registry import Preset, Registry
from cass_plugins.core.settings import SettingError, setting
from cass_plugins.backbone.access import vfm_family
from cass_plugins.backbone.normalization import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

__all__ = ["ProxyCLIP", "ProxyCLIPSettings", "proxy_graph", "PROXYCLIP_VFM_INPUT", "PRESETS", "cass_register"]


def proxy_graph(feats: Tensor, beta: float = 1.2, gamma: float = 3.0, mean: str = "window") -> Tensor:
    """ProxyCLIP's pre-softmax proxy attention from VFM features (with the diagonal guard).

    Args:
        feats: ``(B, C, H', W')`` VFM features.
        beta: β of ``S' = γ·(S − β·mean(S))``.
        gamma: γ.
        mean: ``"window"``: ``mean(S)`` per crop (Q10 fixed); ``"batch"``: one mean over every crop of the batch,
            as Trident computes it over all windows of an image run as one batch (docs/spec/trident.md §3 step 3,
            T-Q1 reproduced; every crop has the same ``M``, so it is the average of the per-crop means).

    Returns:
        ``(B, M, M)`` float32 logits, ``−inf`` where ``S' < 0`` except on the diagonal.
    """
    e = F.normalize(feats.flatten(2).float(), dim=1)  # (B, C, M), unit norm over channels
    s = e.transpose(1, 2) @ e  # (B, M, M) cosine similarities
    if mean not in ("window", "batch"):
        raise ValueError(f"mean must be 'window' or 'batch', got {mean!r}")
    mu = s.mean(dim=(1, 2), keepdim=True) if mean == "window" else s.mean().reshape(1, 1, 1)
    s = gamma * (s - beta * mu)
    m = s.shape[-1]
    masked = (s < 0) & ~torch.eye(m, dtype=torch.bool, device=s.device)  # Q11: never mask the diagonal
    return s.masked_fill(masked, float("-inf"))


#: ProxyCLIP's VFM-input rule (baselines.md §1.5, "VFM input"): its code (``proxyclip_segmentor.py`` with
#: ``myutils.py``'s ``UnNormalize``) undoes the crop's CLIP normalisation as ``x·σ + μ`` with OpenAI CLIP's 0–1
#: constants, although the crop was normalised with mmseg's 0–255 statistics, then applies the VFM's
#: ``(x − mean) / std``. The 0–1 constants are not exactly the 0–255 ones divided by 255, so this differs from the
#: exact inverse CASS uses by ~1e-5 — enough to flip entries of the proxy graph's hard ``S' < 0`` mask. Passed to
#: :class:`~cass_plugins.core.vfm.VFMRunner` (0–255 scale).
PROXYCLIP_VFM_INPUT: dict[str, tuple[float, ...]] = {
    "clip_mean": tuple(255.0 * m for m in OPENAI_CLIP_MEAN),
    "clip_std": tuple(255.0 * s for s in OPENAI_CLIP_STD),
}


def _check_vfm(vfm: nn.Module | None) -> None:
    if vfm is None:
        raise ValueError(
            "ProxyCLIP needs a VFM (DINO v1 or DINOv2 as a timm ViT, e.g. timm.create_model('vit_base_patch8_224.dino')): "
            "pass vfm=...; without one ProxyCLIP runs plain CLIP, which is baseline='vanilla'"
        )
    family = vfm_family(vfm)
    if family == "sam":
        raise ValueError(
            "ProxyCLIP with a SAM image encoder is not supported (it needs SAM's neck features at 1024x1024); "
            "use DINO v1 or DINOv2"
        )
    if family == "mae":
        raise ValueError(
            "ProxyCLIP with MAE is not supported (it needs the input resized to the crop and a resized checkpoint "
            "positional embedding); use DINO v1 or DINOv2"
        )


@dataclass(frozen=True)
class ProxyCLIPSettings(BlockSettings):
    """ProxyCLIP's last block: CLIP's values attended with the VFM-feature proxy graph."""

    arch: str = setting("reduced", choices=("reduced",), doc="no residual, no FFN")
    attn: str = setting("proxy", choices=("proxy",), doc="softmax of the proxy graph S'")
    include_cls: bool = setting(False, choices=(False,), doc="ProxyCLIP never attends with CLS")
    beta: float = setting(1.2, doc="β of S' = γ·(S − β·mean(S))")
    gamma: float = setting(3.0, range=(0.0, None), exclusive=True, doc="γ of S' = γ·(S − β·mean(S))")
    proxy_mean: str = setting(
        "window", choices=("window", "batch"),
        doc="mean(S) per window (ProxyCLIP) or over all windows of the image (Trident, T-Q1; splice mode only)",
    )


class ProxyCLIP(Baseline):
    name = "proxyclip"
    config_class = ProxyCLIPSettings
    needs_vfm = True
    vfm_input = PROXYCLIP_VFM_INPUT
    legacy_keys = {"proxy_beta": "beta", "proxy_gamma": "gamma"}
    graph_fusion_note = (
        "ProxyCLIP's attention is already a graph of VFM features, shared by every head and on the VFM grid; there "
        "is no CLIP attention graph left to distil the VFM graph into. OPS and OTA still apply"
    )

    def __init__(self, settings: ProxyCLIPSettings, runtime: Any) -> None:
        super().__init__(settings, runtime)
        self.vfm = runtime.vfm

    @classmethod
    def check_vfm(cls, vfm: Any) -> None:
        _check_vfm(vfm)

    @classmethod
    def check_config(cls, config: Any) -> None:
        if config.block.proxy_mean == "batch" and config.pipeline.mode != "splice":
            raise SettingError(
                "proxyclip.proxy_mean='batch' averages the proxy graph over all windows of an image, which only "
                "mode='splice' runs as one batch; use proxy_mean='window' or mode='splice'"
            )

    @classmethod
    def has_fusable_graph(cls, settings: BlockSettings) -> bool:
        return False

    @hookimpl
    def cass_attention_graphs(self, ctx: BlockContext) -> list[Tensor]:
        ctx.graph_tokens = "patches"  # ProxyCLIP never attends with CLS
        return self.graphs(ctx)

    def graphs(self, ctx: BlockContext) -> list[Tensor]:
        if ctx.images is None:
            raise RuntimeError("ProxyCLIP needs the crop that entered CLIP; call the model on images")
        feats, vgrid = self.vfm.features(ctx.images)
        ctx.output_grid = (int(vgrid[0]), int(vgrid[1]))
        ctx.graph_keys = [None]
        graph = proxy_graph(feats, self.config.beta, self.config.gamma, self.config.proxy_mean)
        return [graph[:, None]]  # one graph for every head

    def attend(self, ctx: BlockContext) -> Tensor:
        v = self.values(ctx)  # (B, h, N, d) patch values on the CLIP grid
        b, h, n, d = v.shape
        gh, gw = ctx.grid
        vh, vw = ctx.output_grid
        maps = v.reshape(b * h, gh, gw, d).permute(0, 3, 1, 2)
        maps = F.interpolate(maps, size=(vh, vw), mode="bilinear", align_corners=False)
        v = maps.flatten(2).transpose(1, 2).reshape(b, h, vh * vw, d)
        attn = torch.softmax(ctx.graphs[0], dim=-1)  # (B, 1, M, M)
        return attn.to(v.dtype) @ v

    @hookimpl
    def cass_block_output(self, ctx: BlockContext) -> Tensor:
        return ctx.access.out_proj(self.attend(ctx))  # no residual, no FFN, no CLS


# ProxyCLIP's protocol (baselines.md §3): logit scale 40, 336/112 windows, no PAMR (VFM: DINO ViT-B/8 by default).
# Its crop padding to a multiple of 56 (Q13) is a pipeline detail not expressed here.
_PROTOCOL: dict[str, Any] = dict(
    baseline="proxyclip", components=(), logit_scale=40.0, prob_thd=0.0, area_thd=None, crop=336,
    stride=112, short_side=336, mode="slide", pamr_steps=0, class_files="proxyclip",
)
_DATASETS: dict[str, dict[str, Any]] = {
    "voc21": dict(short_side=336, prob_thd=0.2),
    "context60": dict(short_side=336, prob_thd=0.15),
    "coco_object": dict(short_side=336, prob_thd=0.25),
    "voc20": dict(short_side=336),
    "cityscapes": dict(short_side=448, crop=224, stride=112),
    "context59": dict(short_side=336),
    "ade20k": dict(short_side=448),
    "coco_stuff164k": dict(short_side=336),
}

#: preset name -> (values, per-dataset values).
PRESETS: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {"proxyclip": (_PROTOCOL, _DATASETS)}


@hookimpl
def cass_register(registry: Registry) -> None:
    registry.add_baseline(ProxyCLIP)
    for name, (values, datasets) in PRESETS.items():
        registry.add_preset(Preset(name, values, datasets))
