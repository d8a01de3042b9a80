"""NACLIP (baselines.md §1.3): key-key attention plus a Gaussian neighbourhood window Ω, reduced block.

CASS's last block is NACLIP-reduced with CLS dropped, the VFM graph fused into the key graph before Ω is added
(cass.md §1, §9 "Fusion and ω").
"""
from __future__ import annotations

import torch
from torch import Tensor

from cass_plugins.plugins import BlockContext
from cass_plugins.spectral import gaussian_window

from .base import Baseline


class NACLIP(Baseline):
    name = "naclip"
    block_defaults = {"arch": "reduced", "attn": "naclip", "gaussian_std": 5.0, "include_cls": True}

    def graphs(self, ctx: BlockContext) -> list[Tensor]:
        s = ctx.access.scale
        k = self.tokens(ctx, ctx.k)
        strategy = self.config.attn
        if strategy in ("naclip", "kk"):
            return [s * k @ k.transpose(-1, -2)]
        q = self.tokens(ctx, ctx.q)
        if strategy == "vanilla":
            return [s * q @ k.transpose(-1, -2)]
        if strategy == "csa":
            return [s * q @ q.transpose(-1, -2), s * k @ k.transpose(-1, -2)]
        if strategy == "nonly":
            # scalar c = s·mean(‖q_p‖·‖k_P‖) over every head and token pair (NACLIP v2)
            # only Ω·c (added in attend) drives the attention
            b, h, t, _ = k.shape
            return [k.new_zeros(b, h, t, t)]
        raise ValueError(f"unknown NACLIP attention strategy {strategy!r}")

    def attend(self, ctx: BlockContext) -> Tensor:
        v = self.values(ctx)
        graphs = list(ctx.graphs)
        std = self.config.gaussian_std
        if std:
            omega = self.window(ctx, std, graphs[0].dtype)
            if self.config.attn == "nonly":
                q, k = self.tokens(ctx, ctx.q), self.tokens(ctx, ctx.k)
                c = ctx.access.scale * (q.norm(dim=-1)[..., :, None] * k.norm(dim=-1)[..., None, :]).mean()
                graphs = [graphs[0] + omega * c]
            elif self.config.attn in ("naclip",):
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
