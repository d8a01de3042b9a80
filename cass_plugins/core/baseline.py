"""The base class of last-block baselines and the settings every baseline shares.

A baseline is a plugin with two hooks (:mod:`cass_plugins.core.hookspecs`): ``cass_attention_graphs`` returns
the pre-softmax graphs of the patch attention, ``cass_block_output`` turns the (possibly refined) graphs into the
block's patch tokens. Subclasses override :meth:`Baseline.graphs` and, if needed, :meth:`Baseline.attend`; each
declares its settings section (:attr:`Baseline.config_class`).

Every attention of the supported repositories is one of the q/k Gram forms in :data:`STRATEGIES` (SCLIP, Wang et
al. ECCV 2024, Eq. 5; NACLIP, Hajimiri et al. WACV 2025, Eq. 6; ClearCLIP, Lan et al. ECCV 2024, Eq. 3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .hookspecs import BlockContext, hookimpl
from .settings import Settings, SettingError, setting

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config

__all__ = ["Baseline", "BlockSettings", "STRATEGIES"]

#: Attention strategies shared by the adapters (``s = Dh^-0.5``; softmaxes are summed when there are two graphs).
STRATEGIES: dict[str, str] = {
    "vanilla": "softmax(s·Q Kᵀ) - the plain CLIP attention",
    "qq": "softmax(s·Q Qᵀ) - ClearCLIP",
    "kk": "softmax(s·K Kᵀ)",
    "csa": "softmax(s·Q Qᵀ) + softmax(s·K Kᵀ) - SCLIP's correlative self-attention (rows sum to 2)",
    "identity": "each token attends to itself only - MaskCLIP: O = out_proj(V)",
}


def _only_one_layer(value: int) -> str | None:
    if value != 1:
        return (
            "summing the outputs of several final blocks (a ClearCLIP option) is not supported; only the last "
            "block is replaced (use 1, ClearCLIP's default)"
        )
    return None


@dataclass(frozen=True)
class BlockSettings(Settings):
    """Settings every baseline has; subclasses narrow ``attn``/``arch`` and add their own."""

    arch: str = setting(
        "reduced", choices=("reduced", "vanilla"),
        doc="'reduced': the attention output is the block output; 'vanilla': residual + FFN kept",
    )
    attn: str = setting("vanilla", choices=tuple(STRATEGIES), doc="the attention strategy (Baseline.STRATEGIES)")
    include_cls: bool = setting(True, doc="whether CLS takes part in the patch attention (CASS drops it)")
    last_n_layers: int = setting(1, check=_only_one_layer, doc="ClearCLIP: sum of the last n blocks (only 1)")


class Baseline:
    """Base class of last-block baselines.

    Class attributes:
        name: registry name (also the name of its settings section).
        config_class: its settings section (defaults = the baseline as published).
        needs_vfm: the baseline itself reads the VFM (ProxyCLIP); it is then built with the VFM runner.
        vfm_input: keyword arguments of :class:`~cass_plugins.core.vfm.VFMRunner` for how this baseline's authors
            build the VFM input (ProxyCLIP's de-normalisation constants); empty: CASS's exact inverse.
        graph_fusion_note: what a component fusing a graph (CASS's spectral distillation) fuses with here, or why it
            cannot (shown in errors and the docs).
        legacy_keys: flat keys of configurations before 0.2 → this baseline's field names.
    """

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[BlockSettings]] = BlockSettings
    needs_vfm: ClassVar[bool] = False
    vfm_input: ClassVar[dict[str, Any]] = {}
    graph_fusion_note: ClassVar[str] = ""
    legacy_keys: ClassVar[dict[str, str]] = {}

    def __init__(self, settings: BlockSettings, runtime: Any = None) -> None:
        self.config = settings
        self.runtime = runtime

    # -- validation ---------------------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: "Config") -> None:
        """Raise SettingError for a configuration this baseline cannot run (called when it is resolved)."""

    @classmethod
    def check_vfm(cls, vfm: Any) -> None:
        """Raise ValueError for a VFM this baseline cannot use (called before anything is installed)."""

    @classmethod
    def has_fusable_graph(cls, settings: BlockSettings) -> bool:
        """Whether the last block computes a token-token graph another graph can be fused into."""
        return settings.attn != "identity"

    @classmethod
    def no_graph_reason(cls, settings: BlockSettings) -> str:
        """Why these settings leave no graph to fuse into (shown when a graph-fusing component is refused)."""
        if getattr(settings, "attn", None) == "identity":
            return "attn='identity' (MaskCLIP) is the identity attention: no token-token graph"
        return cls.graph_fusion_note or "it has no attention graph to fuse the VFM graph into"

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
        raise SettingError(f"unknown attention strategy {strategy!r}; known: {sorted(STRATEGIES)}")
