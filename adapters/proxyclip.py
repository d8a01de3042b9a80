"""ProxyCLIP (baselines.md §1.5): CLIP's values attended with a proxy attention built from VFM features.

For the last CLIP block only ``V`` is used (Q and K are ignored):

1. per head, ``V`` without CLS on the CLIP grid, bilinearly resized (``align_corners=False``) to the VFM grid
   ``(H', W')`` → ``V'`` with ``M = H'·W'`` tokens;
2. ``E`` = the VFM's final-norm last-block features of the same crop (``VFMRunner.features`` with ProxyCLIP's
   input rule, :func:`proxyclip_vfm_input`: CLIP normalisation undone with OpenAI CLIP's 0–1 constants, ImageNet
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

from collections.abc import Sequence
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cass_plugins.hooks import VFMRunner
from cass_plugins.image import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from cass_plugins.plugins import BlockContext, hookimpl
from cass_plugins.presets import Config

from .base import BASELINE_PROTOCOL_OFF, Baseline

__all__ = ["ProxyCLIP", "proxy_graph", "proxyclip_vfm_input", "use_proxyclip_vfm_input", "PRESETS"]


def proxy_graph(feats: Tensor, beta: float = 1.2, gamma: float = 3.0) -> Tensor:
    """ProxyCLIP's pre-softmax proxy attention from VFM features (per image, with the diagonal guard).

    Args:
        feats: ``(B, C, H', W')`` VFM features.
        beta: β of ``S' = γ·(S − β·mean(S))``.
        gamma: γ.

    Returns:
        ``(B, M, M)`` float32 logits, ``−inf`` where ``S' < 0`` except on the diagonal.
    """
    e = F.normalize(feats.flatten(2).float(), dim=1)  # (B, C, M), unit norm over channels
    s = e.transpose(1, 2) @ e  # (B, M, M) cosine similarities
    s = gamma * (s - beta * s.mean(dim=(1, 2), keepdim=True))  # Q10: mean per image
    m = s.shape[-1]
    masked = (s < 0) & ~torch.eye(m, dtype=torch.bool, device=s.device)  # Q11: never mask the diagonal
    return s.masked_fill(masked, float("-inf"))


def proxyclip_vfm_input(
    clip_normalized: Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """ProxyCLIP's VFM input from a CLIP-normalised crop (baselines.md §1.5, "VFM input").

    ProxyCLIP (``proxyclip_segmentor.py`` with ``myutils.py``'s ``UnNormalize``) undoes the crop's CLIP normalisation
    per channel as ``x·σ + μ`` with OpenAI CLIP's 0–1 constants, although the crop was normalised with mmseg's
    0–255 statistics; then it applies the VFM's ``(x − mean) / std``. The 0–1 constants are not exactly the 0–255
    ones divided by 255, so this is not the exact inverse that :func:`cass_plugins.image.to_vfm_normalization` (CASS's
    rule) computes: the two differ by ~1e-5, enough to flip entries of the proxy graph's hard ``S' < 0`` mask.
    The two affine steps are folded into one, with coefficients and arithmetic in float64 (float32 on MPS).

    Args:
        clip_normalized: ``(3, H, W)`` or ``(B, 3, H, W)`` CLIP-normalised crops.
        mean: The VFM's per-channel mean on the 0–1 scale (ImageNet's, as for DINO / DINOv2).
        std: The VFM's per-channel std on the 0–1 scale.

    Returns:
        Tensor of the input's float dtype (float32 for integer input) and shape.
    """
    if clip_normalized.dim() not in (3, 4) or clip_normalized.shape[-3] != 3:
        raise ValueError(f"expected (3, H, W) or (B, 3, H, W), got shape {tuple(clip_normalized.shape)}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std must have 3 entries (RGB)")
    x = clip_normalized
    # y = (x·σ_c + μ_c − mean) / std = x·a + b
    a = [sc / s for sc, s in zip(OPENAI_CLIP_STD, std)]
    b = [(mc - m) / s for mc, m, s in zip(OPENAI_CLIP_MEAN, mean, std)]
    work = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
    a_t = torch.tensor(a, dtype=work, device=x.device).view(-1, 1, 1)
    b_t = torch.tensor(b, dtype=work, device=x.device).view(-1, 1, 1)
    y = x.to(work) * a_t + b_t
    return y.to(x.dtype if x.is_floating_point() else torch.float32)


def _proxyclip_prepare(runner: VFMRunner, clip_images: Tensor, square: bool) -> Tensor:
    # VFMRunner.prepare with ProxyCLIP's de-normalisation; the square resize is kept for the runner's contract.
    x = proxyclip_vfm_input(clip_images.float(), runner.mean, runner.std)
    if square:
        side = min(x.shape[-2:])
        if x.shape[-2] != side or x.shape[-1] != side:
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=False)
    return x.to(runner.access.dtype)


def use_proxyclip_vfm_input(runner: VFMRunner) -> VFMRunner:
    """Make ``runner`` build its VFM input with :func:`proxyclip_vfm_input` (ProxyCLIP's rule) instead of CASS's.

    ``patch_clip`` creates one plain ``VFMRunner`` per patch and hands it to the baseline; the ProxyCLIP adapter
    swaps that runner's ``prepare`` (only on this instance: other runners, and CASS's rule, are untouched). Its
    ``features`` and ``keys`` then use the new input; the VFM's mean/std stay the runner's own.

    Returns:
        The same runner.
    """
    runner.prepare = MethodType(_proxyclip_prepare, runner)  # type: ignore[method-assign]
    return runner


def _check_vfm(vfm: nn.Module | None) -> None:
    if vfm is None:
        raise ValueError(
            "ProxyCLIP needs a VFM (DINO v1 or DINOv2 as a timm ViT, e.g. timm.create_model('vit_base_patch8_224.dino')): "
            "pass vfm=...; without one ProxyCLIP runs plain CLIP, which is baseline='vanilla'"
        )
    cfg = getattr(vfm, "pretrained_cfg", None) or {}
    tag = str(cfg.get("tag") or "").lower()
    arch = str(cfg.get("architecture") or "").lower()
    kind = type(vfm).__name__
    if hasattr(vfm, "neck") or "sam" in kind.lower() or kind == "ImageEncoderViT" or arch.startswith("samvit") or "sam" in tag.split("_"):
        raise ValueError(
            "ProxyCLIP with a SAM image encoder is not supported (it needs SAM's neck features at 1024x1024); "
            "use DINO v1 or DINOv2"
        )
    if "mae" in tag.split("_"):
        raise ValueError(
            "ProxyCLIP with MAE is not supported (it needs the input resized to the crop and a resized checkpoint "
            "positional embedding); use DINO v1 or DINOv2"
        )


class ProxyCLIP(Baseline):
    name = "proxyclip"
    needs_vfm = True
    block_defaults = {"arch": "reduced", "attn": "proxy", "gaussian_std": None, "include_cls": False}
    attn_choices = ("proxy",)
    arch_choices = ("reduced",)
    supports_spectral = False
    spectral_note = (
        "ProxyCLIP's attention is already a graph of VFM features, shared by every head and on the VFM grid; there "
        "is no CLIP attention graph left to distil the VFM graph into. OPS and OTA still apply"
    )

    def __init__(self, config: Config, vfm: VFMRunner | None) -> None:
        self.check_config(config, vfm.model if vfm is not None else None)
        self.config = config
        # ProxyCLIP's own VFM-input rule (baselines.md §1.5), set after the checks so a refused config leaves the
        # runner as it was.
        self.vfm = use_proxyclip_vfm_input(vfm) if vfm is not None else None

    @classmethod
    def check_config(cls, config: Config, vfm: nn.Module | None = None) -> None:
        super().check_config(config, vfm)
        _check_vfm(vfm)

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
        graph = proxy_graph(feats, self.config.proxy_beta, self.config.proxy_gamma)
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
    ProxyCLIP.block_defaults, baseline="proxyclip", logit_scale=40.0, prob_thd=0.0, area_thd=None, crop=336,
    stride=112, short_side=336, mode="slide", pamr_steps=0, class_files="proxyclip", **BASELINE_PROTOCOL_OFF,
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

#: preset name -> (values, per-dataset values), registered by :mod:`adapters`.
PRESETS: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {"proxyclip": (_PROTOCOL, _DATASETS)}
