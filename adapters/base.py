"""Shared machinery of the baseline adapters: a baseline is a plugin with two hooks.

``cass_attention_graphs`` returns the pre-softmax graphs; ``cass_block_output`` turns the (possibly refined)
graphs into the block's patch tokens. Subclasses override :meth:`graphs` and, if needed, :meth:`attend`.

Every attention strategy of the supported repositories is one of the q/k Gram forms in :data:`STRATEGIES`; a
baseline declares which strategies and architectures it accepts, and :meth:`Baseline.check_config` rejects the
rest before ``patch_clip`` installs anything.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cass_plugins.plugins import BlockContext, hookimpl
from cass_plugins.presets import Config

__all__ = ["Baseline", "STRATEGIES", "BASELINE_PROTOCOL_OFF"]

#: Attention strategies shared by the adapters (``s = Dh^-0.5``; softmaxes are summed when there are two graphs).
STRATEGIES: dict[str, str] = {
    "vanilla": "softmax(s·Q Kᵀ) - the plain CLIP attention",
    "qq": "softmax(s·Q Qᵀ) - ClearCLIP",
    "kk": "softmax(s·K Kᵀ)",
    "csa": "softmax(s·Q Qᵀ) + softmax(s·K Kᵀ) - SCLIP's correlative self-attention (rows sum to 2)",
    "identity": "each token attends to itself only - MaskCLIP: O = out_proj(V)",
}

#: The CASS components are off in every baseline's own preset.
BASELINE_PROTOCOL_OFF: dict[str, Any] = {"spectral": False, "presence_prior": False, "ota": False}


class Baseline:
    """Base class of last-block baselines (see :mod:`cass_plugins.plugins` for the hook order).

    Attributes:
        name: registry name.
        block_defaults: last-block configuration values this baseline implies (applied by ``patch_clip`` when the
            baseline is chosen explicitly).
        attn_choices: the ``Config.attn`` values this baseline accepts.
        arch_choices: the ``Config.arch`` values this baseline accepts.
        uses_gaussian: whether ``Config.gaussian_std`` means anything here (NACLIP only; the others ignore it, and
            their ``block_defaults`` set it to ``None`` so the resolved configuration says so).
        supports_spectral: whether CASS's VFM graph can be fused into this baseline's graphs at all.
        spectral_note: what the VFM graph fuses with, or why it cannot (shown in errors and the docs).
    """

    name = "base"
    block_defaults: dict[str, Any] = {}
    attn_choices: tuple[str, ...] = ()
    arch_choices: tuple[str, ...] = ("reduced", "vanilla")
    uses_gaussian = False
    supports_spectral = True
    spectral_note = ""

    def __init__(self, config: Config) -> None:
        self.check_config(config)
        self.config = config

    # -- validation ---------------------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: Config, vfm: nn.Module | None = None) -> None:
        """Raise ValueError for a configuration this baseline cannot run (called by ``patch_clip`` first)."""
        if cls.attn_choices and config.attn not in cls.attn_choices:
            raise ValueError(f"baseline {cls.name!r}: attn={config.attn!r} is not one of {cls.attn_choices}")
        if config.arch not in cls.arch_choices:
            raise ValueError(f"baseline {cls.name!r}: arch={config.arch!r} is not one of {cls.arch_choices}")
        if config.last_n_layers != 1:
            raise ValueError(
                f"last_n_layers={config.last_n_layers}: summing the outputs of several final blocks (a ClearCLIP "
                "option) is not supported; only the last block is replaced (use last_n_layers=1, ClearCLIP's default)"
            )
        if config.spectral and not cls.spectral_ok(config):
            raise ValueError(
                f"spectral distillation cannot be combined with baseline {cls.name!r} (attn={config.attn!r}): "
                f"{cls.spectral_note or 'it has no attention graph to fuse the VFM graph into'}"
            )

    @classmethod
    def spectral_ok(cls, config: Config) -> bool:
        return cls.supports_spectral and config.attn != "identity"

    # -- the two hooks ------------------------------------------------------------------------------------------
    @hookimpl
    def cass_attention_graphs(self, ctx: BlockContext) -> list[Tensor]:
        ctx.graph_tokens = "all" if self.config.include_cls else "patches"
        return self.graphs(ctx)

    @hookimpl
    def cass_block_output(self, ctx: BlockContext) -> Tensor:
        attn_out = self.attend(ctx)  # (B, h, Tq, Dh)
        out = ctx.access.out_proj(attn_out)
        x_rows = ctx.x if ctx.graph_tokens == "all" else ctx.x[:, ctx.num_prefix:]
        if self.config.arch == "vanilla":
            out = ctx.access.residual_mlp(x_rows, out)
        return out[:, ctx.num_prefix:] if ctx.graph_tokens == "all" else out

    # -- to override --------------------------------------------------------------------------------------------
    def graphs(self, ctx: BlockContext) -> list[Tensor]:
        return self.strategy_graphs(ctx, self.config.attn)

    def attend(self, ctx: BlockContext) -> Tensor:
        """One softmax per graph, summed, applied to v; no graph = identity attention (MaskCLIP)."""
        v = self.values(ctx)
        if not ctx.graphs:
            return v
        attn = sum(torch.softmax(g, dim=-1) for g in ctx.graphs)
        return attn.to(v.dtype) @ v

    # -- helpers ------------------------------------------------------------------------------------------------
    def tokens(self, ctx: BlockContext, t: Tensor) -> Tensor:
        """``t`` (B, h, T, Dh) restricted to the tokens that take part in the attention."""
        return t if ctx.graph_tokens == "all" else t[:, :, ctx.num_prefix:]

    def values(self, ctx: BlockContext) -> Tensor:
        return self.tokens(ctx, ctx.v)

    def strategy_graphs(self, ctx: BlockContext, strategy: str) -> list[Tensor]:
        """Pre-softmax graphs of one of :data:`STRATEGIES`; also records which tokens each graph is the Gram
        matrix of (``ctx.graph_keys``), so spectral distillation matches a q-q graph against q, not k.

        A q-k graph is not a Gram matrix (its spectrum is complex); it is distilled against the keys, as CASS's
        key-key graph is.
        """
        s = ctx.access.scale
        q, k = self.tokens(ctx, ctx.q), self.tokens(ctx, ctx.k)
        if strategy == "vanilla":
            ctx.graph_keys = [k]
            return [s * q @ k.transpose(-1, -2)]
        if strategy == "qq":
            ctx.graph_keys = [q]
            return [s * q @ q.transpose(-1, -2)]
        if strategy == "kk":
            ctx.graph_keys = [k]
            return [s * k @ k.transpose(-1, -2)]
        if strategy == "csa":
            ctx.graph_keys = [q, k]
            return [s * q @ q.transpose(-1, -2), s * k @ k.transpose(-1, -2)]
        if strategy == "identity":
            ctx.graph_keys = []
            return []
        raise ValueError(f"unknown attention strategy {strategy!r}; known: {sorted(STRATEGIES)}")
