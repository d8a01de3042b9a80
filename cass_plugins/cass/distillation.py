"""CASS spectral object-level context distillation as a last-block component (CASS §3.2, Eq. 3–7; authors'
``cass.py``; docs/spec/cass.md §2, §6, §9).

For every crop: VFM keys resized to the CLIP grid and range-matched to the CLIP keys; per-head graphs; top-m
normalised spectra; Hungarian head matching on ``1 − W``; the matched VFM graph's low-rank approximation with dynamic
eigenscaling, zero diagonal, range-matched to the CLIP graph, fused with weight ``λ·w``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor, nn

from cass_plugins.core.hookspecs import BlockContext, hookimpl
from cass_plugins.core.settings import Settings, SettingError, setting
from cass_plugins.core.vfm import resize_keys

from . import spectral
from .matching import HeadMatching, match_heads

if TYPE_CHECKING:  # pragma: no cover
    from cass_plugins.core.config import Config

__all__ = ["SpectralConfig", "SpectralAttentionHook", "matching_for_window", "check_spectral", "SPECTRAL_LEGACY_KEYS"]


def _is_heads(value: Any) -> bool:
    """A non-empty sequence of int head indices (bools are not heads)."""
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


def _check_matching(value: Any) -> str | None:
    if callable(value) or value in ("complementary", "similar", "sequential"):
        return None
    if _is_heads(value) or (isinstance(value, tuple) and value and all(_is_heads(m) for m in value)):
        return None
    return (
        "use 'complementary', 'similar', 'sequential', a sequence of VFM head indices (one per CLIP head), a list "
        "of such sequences (one per window), or a callable fn(cost, window_index)"
    )


def _parse_matching(text: str) -> Any:
    raw = text.strip()
    if raw in ("complementary", "similar", "sequential"):
        return raw
    import json

    try:
        value = json.loads(raw) if raw.startswith("[") else [int(v) for v in raw.split(",")]
    except ValueError:
        raise SettingError(
            f"spectral.matching={text!r}: expected complementary|similar|sequential, heads such as 0,1,2,3, or "
            "[[0,1,2,3],[3,2,1,0]] (one assignment per window)"
        ) from None
    return value


@dataclass(frozen=True)
class SpectralConfig(Settings):
    """Settings of spectral distillation; defaults are ``cass-official`` (docs/spec/cass.md §6)."""

    matching: Any = setting(
        "complementary", check=_check_matching, parse=_parse_matching,
        doc="head matching: complementary|similar|sequential, explicit heads, one list per window, or fn(cost, window)",
    )
    tie_break: str | None = setting(None, choices=(None, "sequential", "round"), doc="among tied optima")
    pairing: str = setting(
        "official", choices=("official", "paper"),
        doc="'official': the authors' inverse reading of the solver (docs/matching.md); 'paper': the true pairs",
    )
    solve_dtype: str = setting("float32", choices=("float32", "float64"), doc="cost precision handed to the solver")
    lowrank: str | None = setting(
        "randomized", choices=("randomized", "exact", "energy", "eigengap", None),
        doc="low-rank approximation of the VFM graph (None: the full graph)",
    )
    rank: int = setting(10, range=(1, None), doc="low-rank rank r")
    lowrank_seed: int = setting(0, doc="seed of the randomized low rank")
    energy_eta: float = setting(0.95, range=(0.0, 1.0), doc="Algorithm 1's energy fraction η")
    eigenscaling: bool = setting(True, doc="dynamic eigenscaling of the retained eigenvalues")
    eigenscale_eps: float = setting(1.5, range=(0.0, 2.0), doc="ε of the eigenscaling (σ range → [(2−ε)σmin, εσmax])")
    fusion_lambda: float = setting(10.0, range=(0.0, None), doc="λ of (λ·w·D + A)/(λ·w + 1)")
    spectrum_size: int = setting(20, range=(1, None), doc="top-m eigenvalues compared per head")
    vfm_fp16_keys: bool = setting(False, doc="round the VFM keys to fp16 as the authors' code does")


#: Flat keys of versions before 0.2.
SPECTRAL_LEGACY_KEYS = {name: name for name in SpectralConfig.field_names()}


def check_spectral(config: "Config") -> None:
    """Refuse baselines without a token-token graph to fuse the VFM graph into."""
    cls = config.registry.baseline(config.baseline)
    if not cls.has_fusable_graph(config.block):
        note = cls.no_graph_reason(config.block)
        attn = getattr(config.block, "attn", None)
        raise SettingError(
            f"spectral distillation (component 'spectral') cannot be combined with baseline {config.baseline!r}"
            f"{f' (attn={attn!r})' if attn else ''}: {note}; drop 'spectral' from the components"
        )


def matching_for_window(matching: Any, cost: Tensor, window: int) -> str | Sequence[int]:
    """The head-matching strategy or explicit assignment of one window (``spectral.matching``).

    ``matching`` is a strategy name, one explicit assignment for every window, a sequence of explicit assignments
    indexed by window, or a callable ``fn(cost, window_index)`` returning either of the first two.
    """
    if callable(matching):
        chosen = matching(cost.detach().clone(), window)
        if not isinstance(chosen, (str, Tensor)) and not _is_heads(chosen):
            raise TypeError(
                f"the matching callable returned {chosen!r} for window {window}: return a strategy name or a "
                "sequence of VFM head indices (one per CLIP head)"
            )
        return chosen
    if isinstance(matching, str) or _is_heads(matching):
        return matching
    if window >= len(matching):
        raise ValueError(
            f"matching gives assignments for {len(matching)} windows but window {window} was reached; give one "
            "per window of every image (cass_plugins.pipeline.windows.window_grid counts them), or a callable"
        )
    return matching[window]


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on ``device``: through pinned memory without blocking for CUDA (no synchronisation)."""
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


class SpectralAttentionHook:
    """CASS spectral distillation as a last-block component (``components=["spectral"]``).

    Built by the registry for a patch (``SpectralAttentionHook(settings, runtime)``; ``runtime.vfm`` is the
    :class:`~cass_plugins.core.vfm.VFMRunner`). The matching of every crop of the last forward is kept in
    :attr:`last_matching` (cost, fused heads, pairs, weights, ranks, margin, window).
    """

    def __init__(self, config: SpectralConfig, runtime: Any) -> None:
        self.config = config
        self.vfm = runtime.vfm
        self.last_matching: list[HeadMatching] = []

    @staticmethod
    def attach(model: nn.Module, vfm: nn.Module, preset: str = "cass-official", **overrides: Any) -> Any:
        """Attach only this component (NACLIP-reduced block + VFM graph; no OPS/OTA) to ``model``.

        Shorthand for ``patch_clip(model, vfm, preset, components=["spectral"], **overrides)``; returns its
        :class:`~cass_plugins.core.patch.PatchHandle` (``remove()`` / context manager).
        """
        from cass_plugins.core.patch import patch_clip

        return patch_clip(model, vfm, preset, components=["spectral"], **overrides)

    @hookimpl(tryfirst=True)
    def cass_refine_graphs(self, ctx: BlockContext) -> None:
        cfg = self.config
        if ctx.graph_tokens != "patches":
            raise RuntimeError("spectral distillation fuses patch-only graphs; the baseline must drop CLS")
        if ctx.images is None:
            raise RuntimeError("the crop that entered CLIP was not observed; call the model on images")
        vfm_k, vgrid = self.vfm.keys(ctx.images)
        if cfg.vfm_fp16_keys:
            vfm_k = vfm_k.half()
        # resized to the CLIP grid once; every graph source (q or k of the same block) shares the dtype
        vfm_k = resize_keys(vfm_k.to(ctx.k.dtype), vgrid, ctx.grid)
        # Each graph is distilled against the tokens it is the Gram matrix of (keys by default; q for a q-q graph
        # of SCLIP/ClearCLIP). Graphs sharing those tokens share one matching and one distilled VFM graph.
        sources = list(ctx.graph_keys) if ctx.graph_keys is not None else [None] * len(ctx.graphs)
        if len(sources) != len(ctx.graphs):
            raise RuntimeError(f"{len(ctx.graphs)} graphs but {len(sources)} graph_keys entries")
        distilled: dict[int, tuple[Tensor, Tensor, list[HeadMatching]]] = {}
        all_matchings: list[list[HeadMatching]] = []
        for i, graph in enumerate(ctx.graphs):
            src = sources[i]
            key = -1 if src is None else id(src)
            if key not in distilled:
                clip_k = ctx.patch_k if src is None else src
                distilled[key] = self._distill(ctx, vfm_k, clip_k)
                all_matchings.append(distilled[key][2])
            vfm_graph, weights, _ = distilled[key]
            d = spectral.range_match(vfm_graph, graph, dims=(2, 3))
            ctx.graphs[i] = spectral.fuse_graphs(d, graph, weights, cfg.fusion_lambda)  # in graph's dtype
        self.last_matching = all_matchings[0] if all_matchings else []
        ctx.record["matching"] = self.last_matching
        if len(all_matchings) > 1:
            ctx.record["matching_per_source"] = all_matchings

    def _distill(
        self, ctx: BlockContext, vfm_k: Tensor, clip_k: Tensor
    ) -> tuple[Tensor, Tensor, list[HeadMatching]]:
        """Steps 3-10 of docs/spec/cass.md §2 against ``clip_k`` (VFM keys already on the CLIP grid): the distilled
        VFM graph, fusion weights and matchings.

        On the device path (:func:`~cass_plugins.cass.spectral.use_device_math`: CUDA inputs) everything runs on the
        keys' device in float32 except the assignment: the ``(B, Hv, Hc)`` costs cross to the host once for the
        whole batch, and the assignments and weights come back in one pinned, non-blocking copy.
        """
        cfg = self.config
        device_math = spectral.use_device_math(clip_k)
        work = torch.float32 if device_math else torch.float64
        vfm_k = spectral.range_match(vfm_k, clip_k, dims=(1, 2, 3))
        scale = ctx.access.scale  # both graphs use CLIP's Dh^-0.5 (cass.md §9)
        spec_c, spec_v = self._spectra(clip_k, vfm_k, scale, device_math)
        cost = spectral.spectral_cost(spec_v, spec_c)  # (B, Hv, Hc)
        if device_math:
            cost = cost.cpu()  # the one host round trip of the forward: the solver runs on the host
        solve_dtype = torch.float32 if cfg.solve_dtype == "float32" else torch.float64
        # the official reading takes the solver's column index as a VFM head: only defined for equal head counts
        pairing = cfg.pairing if cost.shape[1] == cost.shape[2] else "paper"
        matchings = []
        windows = ctx.window_indices or list(range(cost.shape[0]))
        for c, window in zip(cost, windows):  # one (Hv, Hc) cost per crop
            strategy = matching_for_window(cfg.matching, c, window)
            m = match_heads(c, strategy, solve_dtype=solve_dtype, tie_break=cfg.tie_break, pairing=pairing)
            m.window = window
            matchings.append(m)
        assignment = _to_device(torch.stack([m.assignment for m in matchings]), clip_k.device)  # (B, Hc)
        weights = _to_device(torch.stack([m.weights for m in matchings]).to(work), clip_k.device)
        # the low rank and its eigenscaling in float64 (cass.md §9), float32 on the device path; the exact paths
        # need only the keys
        matched_k = spectral.gather_heads(vfm_k, assignment).to(work)  # (B, Hc, N, Dh_v)
        graph = spectral.attention_graph(matched_k, scale) if cfg.lowrank in ("randomized", None) else None
        vfm_graph, ranks = spectral.distilled_vfm_graph(
            graph, vfm_keys=matched_k, scale=scale,
            lowrank=cfg.lowrank, rank=cfg.rank, eigenscaling=cfg.eigenscaling and cfg.lowrank is not None,
            eps=cfg.eigenscale_eps, seed=cfg.lowrank_seed, eta=cfg.energy_eta, device_math=device_math,
        )
        if ranks is not None:
            host_ranks = ranks.detach().cpu()  # one copy for the batch, not one per window
            for i, m in enumerate(matchings):
                m.ranks = host_ranks[i]
        return vfm_graph, weights, matchings

    def _spectra(self, clip_k: Tensor, vfm_k: Tensor, scale: float, device_math: bool) -> tuple[Tensor, Tensor]:
        """Normalised top-m spectra of the CLIP and VFM keys (cass.md §2.5); one solver call for both on the device
        path when their head widths agree."""
        m = self.config.spectrum_size
        if device_math and clip_k.shape[-1] == vfm_k.shape[-1] and clip_k.shape[-2] == vfm_k.shape[-2]:
            both = spectral.key_spectrum(torch.cat([clip_k.float(), vfm_k.float()], dim=1), scale, m, device_math=True)
            spec_c, spec_v = both[:, : clip_k.shape[1]], both[:, clip_k.shape[1]:]
        else:
            # no keyword: the default picks the same path (use_device_math of the keys)
            spec_c = spectral.key_spectrum(clip_k, scale, m)
            spec_v = spectral.key_spectrum(vfm_k, scale, m)
        return spectral.normalize_spectrum(spec_c), spectral.normalize_spectrum(spec_v)
