"""Shared machinery of the baseline adapters: a baseline is a plugin with two hooks.

``cass_attention_graphs`` returns the pre-softmax graphs; ``cass_block_output`` turns the (possibly refined)
graphs into the block's patch tokens. Subclasses override :meth:`graphs` and, if needed, :meth:`attend`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cass_plugins.plugins import BlockContext, hookimpl
from cass_plugins.presets import Config


class Baseline:
    """Base class of last-block baselines (see :mod:`cass_plugins.plugins` for the hook order).

    Attributes:
        name: registry name.
        block_defaults: last-block configuration values this baseline implies (applied by ``patch_clip`` when the
            baseline is chosen explicitly).
        supports_spectral: whether CASS's VFM graph can be fused into this baseline's graphs.
    """

    name = "base"
    block_defaults: dict[str, Any] = {}
    supports_spectral = True

    def __init__(self, config: Config) -> None:
        self.config = config

    # -- the two hooks ------------------------------------------------------------------------------------------
    @hookimpl
    def cass_attention_graphs(self, ctx: BlockContext) -> list[Tensor]:
        ctx.graph_tokens = "all" if self.config.include_cls else "patches"
        return self.graphs(ctx)

    @hookimpl
    def cass_block_output(self, ctx: BlockContext) -> Tensor:
        attn_out = self.attend(ctx)  # (B, h, Tq, Dh)
        out = ctx.access.out_proj(attn_out)
        if ctx.graph_tokens == "all":
            x_rows, out = ctx.x, out
        else:
            x_rows = ctx.x[:, ctx.num_prefix:]
        if self.config.arch == "vanilla":
            out = ctx.access.residual_mlp(x_rows, out)
        return out[:, ctx.num_prefix:] if ctx.graph_tokens == "all" else out

    # -- to override --------------------------------------------------------------------------------------------
    def graphs(self, ctx: BlockContext) -> list[Tensor]:
        raise NotImplementedError

    def attend(self, ctx: BlockContext) -> Tensor:
        """Default: one softmax per graph, summed, applied to v."""
        v = self.values(ctx)
        attn = sum(torch.softmax(g, dim=-1) for g in ctx.graphs)
        return attn.to(v.dtype) @ v

    # -- helpers ------------------------------------------------------------------------------------------------
    def tokens(self, ctx: BlockContext, t: Tensor) -> Tensor:
        """``t`` (B, h, T, Dh) restricted to the tokens that take part in the attention."""
        return t if ctx.graph_tokens == "all" else t[:, :, ctx.num_prefix:]

    def values(self, ctx: BlockContext) -> Tensor:
        return self.tokens(ctx, ctx.v)
