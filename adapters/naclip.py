"""NACLIP (baselines.md §1.3): key-key attention plus a Gaussian neighbourhood window Ω, reduced block.

Settings as in NACLIP v2: ``arch ∈ {reduced, vanilla}`` and ``attn ∈ {naclip, nonly, kk, csa, vanilla}``,
defaults ``reduced`` / ``naclip`` / ``gaussian_std=5``. NACLIP's own rules are enforced: ``csa`` needs
``arch='vanilla'``, and ``naclip`` / ``nonly`` need ``gaussian_std > 0``.

- ``naclip``: ``softmax(s·K Kᵀ + Ω)``; Ω is added before the softmax, the same for every head and image; with CLS
  in the attention, its row and column get no addition (NACLIP's ``adjust_for_cls``).
- ``nonly``: ``softmax(Ω·c)``, ``c = s·mean(‖q_p‖·‖k_P‖)`` over every head and token pair, CLS included.
- ``kk`` / ``csa`` / ``vanilla``: no Ω (as in NACLIP, the window is only used by ``naclip`` and ``nonly``).

Quirks: Q5 (F) NACLIP allocates the ``nonly`` logits as ``(heads, T, T)`` and so runs batch size 1 only, with the
mean taken over the whole batch; here ``c`` is computed per image (identical at batch size 1). The Ω cache keyed by
grid size is not needed (Ω is rebuilt per forward, cheaply).

CASS's last block is NACLIP-reduced with CLS dropped, the VFM graph fused into the key graph before Ω is added
(cass.md §1, §9 "Fusion and ω"); ``patch_clip(baseline="naclip", components=["spectral", "ops", "ota"])`` is the
``cass-official`` preset. ``cass-paper`` (no ω, Eq. 2) is the ``kk`` strategy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cass_plugins.cass.spectral import gaussian_window
from cass_plugins.core.baseline import Baseline, BlockSettings
from cass_plugins.core.hookspecs import BlockContext, hookimpl
from cass_plugins.core.registry import Preset, Registry
from cass_plugins.core.settings import SettingError, setting

__all__ = ["NACLIP", "NACLIPSettings", "PRESETS", "cass_register"]


@dataclass(frozen=True)
class NACLIPSettings(BlockSettings):
    """NACLIP v2's last-block settings (defaults: the method as published)."""

    attn: str = setting(
        "naclip", choices=("naclip", "nonly", "kk", "csa", "vanilla"),
        doc="naclip: softmax(s·KKᵀ + Ω); nonly: softmax(Ω·c); kk, csa, vanilla: without Ω",
    )
    gaussian_std: float | None = setting(5.0, range=(0.0, None), exclusive=True, doc="std of the Gaussian window Ω")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attn == "csa" and self.arch != "vanilla":
            raise SettingError("naclip.attn='csa' (SCLIP's attention) needs naclip.arch='vanilla', as in NACLIP")
        if self.attn in ("naclip", "nonly") and self.gaussian_std is None:
            raise SettingError(
                f"naclip.attn={self.attn!r} needs naclip.gaussian_std > 0 (got None); for key-key attention without "
                "the window use attn='kk'"
            )


class NACLIP(Baseline):
    name = "naclip"
    config_class = NACLIPSettings
    graph_fusion_note = (
        "fused into the key-key graph s·K Kᵀ before Ω is added (CASS); with attn='csa' into both the q-q graph "
        "(matched against q) and the k-k graph; with attn='vanilla' into the q-k logits (matched against k); "
        "attn='nonly' has no data-dependent graph (Ω·c only) and is refused"
    )

    @classmethod
    def has_fusable_graph(cls, settings: NACLIPSettings) -> bool:
        return settings.attn != "nonly"

    @classmethod
    def no_graph_reason(cls, settings: NACLIPSettings) -> str:
        return "attn='nonly' attends with the Gaussian window alone (Ω·c): no data-dependent graph; use attn='naclip'"

    def graphs(self, ctx: BlockContext) -> list[Tensor]:
        strategy = self.config.attn
        if strategy == "naclip":
            return self.strategy_graphs(ctx, "kk")
        if strategy == "nonly":
            # only Ω·c (added in attend) drives the attention: the logits start at zero
            k = self.tokens(ctx, ctx.k)
            b, h, t, _ = k.shape
            ctx.graph_keys = [None]
            return [k.new_zeros(b, h, t, t)]
        return self.strategy_graphs(ctx, strategy)

    def attend(self, ctx: BlockContext) -> Tensor:
        v = self.values(ctx)
        graphs = list(ctx.graphs)
        strategy = self.config.attn
        if strategy in ("naclip", "nonly"):
            omega = self.window(ctx, self.config.gaussian_std, graphs[0].dtype)
            if strategy == "nonly":
                q, k = self.tokens(ctx, ctx.q), self.tokens(ctx, ctx.k)
                # mean over heads and all (p, P) pairs of ‖q_p‖·‖k_P‖ = per-head product of the mean norms, per image
                c = ctx.access.scale * (q.norm(dim=-1).mean(-1) * k.norm(dim=-1).mean(-1)).mean(-1)
                graphs = [graphs[0] + omega * c[:, None, None, None].to(omega.dtype)]
            else:
                graphs = [graphs[0] + omega]
        attn = sum(torch.softmax(g, dim=-1) for g in graphs)
        return attn.to(v.dtype) @ v

    def window(self, ctx: BlockContext, std: float, dtype: torch.dtype) -> Tensor:
        gh, gw = ctx.grid
        omega = gaussian_window(gh, gw, std, dtype=torch.float32, device=ctx.x.device)
        if ctx.graph_tokens == "all":
            # prefix rows and columns get no addition (NACLIP adjust_for_cls)
            p = ctx.num_prefix
            omega = torch.nn.functional.pad(omega, (p, 0, p, 0))
        return omega.to(dtype)


# NACLIP's protocol (baselines.md §3): logit scale 40, 224/112 windows, PAMR on (10 steps, dilations 8 and 16);
# VOC21 and VOC20 run on the whole image (slide_crop=0).
_PROTOCOL: dict[str, Any] = dict(
    baseline="naclip", components=(), logit_scale=40.0, prob_thd=0.0, area_thd=None, crop=224, stride=112,
    short_side=336, mode="slide", pamr_steps=10, pamr_dilations=(8, 16), class_files="naclip",
)
_DATASETS: dict[str, dict[str, Any]] = {
    "voc21": dict(short_side=336, prob_thd=0.1, mode="whole"),
    "context60": dict(short_side=336, prob_thd=0.1),
    "coco_object": dict(short_side=336, prob_thd=0.1),
    "voc20": dict(short_side=336, mode="whole"),
    "cityscapes": dict(short_side=560),
    "context59": dict(short_side=336),
    "ade20k": dict(short_side=336),
    "coco_stuff164k": dict(short_side=336),  # 448 in NACLIP v1
}

#: preset name -> (values, per-dataset values).
PRESETS: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {"naclip": (_PROTOCOL, _DATASETS)}


@hookimpl
def cass_register(registry: Registry) -> None:
    registry.add_baseline(NACLIP)
    for name, (values, datasets) in PRESETS.items():
        registry.add_preset(Preset(name, values, datasets))
