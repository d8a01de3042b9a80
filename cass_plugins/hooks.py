"""Forward hooks: the last-block hook that runs the plugin chain, the VFM key capture, and CASS's
:class:`SpectralAttentionHook` component (cass.md §2).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import pluggy
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import spectral
from .backbone import ViTAccess, vit_access
from .image import IMAGENET_MEAN, IMAGENET_STD, to_vfm_normalization
from .matching import HeadMatching, match_heads
from .plugins import BlockContext, hookimpl
from .presets import Config

log = logging.getLogger(__name__)

__all__ = ["PatchState", "LastBlockHook", "VFMRunner", "SpectralAttentionHook"]


@dataclass
class PatchState:
    """Mutable per-forward state shared by the hooks of one patch."""

    images: Tensor | None = None  # crops seen by the patch embedding (CLIP-normalised)
    grid: tuple[int, int] | None = None
    output_grid: tuple[int, int] | None = None
    bypass: bool = False  # run the unmodified block (used for whole-image embeddings)
    record: dict[str, Any] = field(default_factory=dict)
    windows_seen: int = 0  # crops through the patched block since the last reset: the next crop's window index


class LastBlockHook:
    """Forward hook on the CLIP tower's last block: replaces the patch rows of its output.

    Prefix rows (CLS) keep the unmodified block's output, so the pooled image embedding of the patched model is
    the original one (cass.md §1).
    """

    def __init__(self, access: ViTAccess, pm: pluggy.PluginManager, state: PatchState) -> None:
        self.access, self.pm, self.state = access, pm, state

    def observe_images(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        images = args[0]
        self.state.images = images
        self.state.grid = self.access.grid_for(images.shape[-2], images.shape[-1])

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        if self.state.bypass:
            return None
        acc = self.access
        x = acc.to_batch_first(args[0])
        out = acc.to_batch_first(output)
        grid = self._grid(x.shape[1] - acc.num_prefix_tokens)
        q, k, v = acc.qkv(x)
        images = self.state.images if self.state.images is not None and self.state.images.shape[0] == x.shape[0] else None
        first = self.state.windows_seen
        self.state.windows_seen += x.shape[0]
        ctx = BlockContext(
            access=acc, x=x, block_output=out, q=q, k=k, v=v, grid=grid, images=images,
            window_indices=list(range(first, first + x.shape[0])),
        )
        graphs = self.pm.hook.cass_attention_graphs(ctx=ctx)
        if graphs is None:
            raise RuntimeError("no baseline plugin produced attention graphs; register one (e.g. adapters.NACLIP)")
        ctx.graphs = list(graphs)
        self.pm.hook.cass_refine_graphs(ctx=ctx)
        patch = self.pm.hook.cass_block_output(ctx=ctx)
        ctx.patch_output = patch
        self.state.output_grid = ctx.output_grid or grid
        self.state.record = ctx.record
        new = torch.cat([out[:, : acc.num_prefix_tokens], patch.to(out.dtype)], dim=1)
        return acc.from_batch_first(new)

    def _grid(self, num_patches: int) -> tuple[int, int]:
        grid = self.state.grid
        if grid is not None and grid[0] * grid[1] == num_patches:
            return grid
        side = int(round(num_patches ** 0.5))
        if side * side != num_patches:
            raise RuntimeError(
                f"cannot infer the patch grid of {num_patches} tokens; run the model through its patch embedding "
                "(model.encode_image / cass_plugins.encode_dense) so the hook sees the image size"
            )
        return side, side


class _KeysCaptured(Exception):
    """Raised by the VFM's last-block pre-hook: nothing after the keys is needed."""


class VFMRunner:
    """Runs a vision foundation model on CLIP-normalised crops and returns its last-block keys or features.

    The last block's input is captured by a forward pre-hook (its handle lives in :attr:`handle`); when only keys
    are wanted the hook stops the forward there, so the VFM's last block and head never run.
    """

    def __init__(
        self,
        vfm: nn.Module,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        pos_interp: str | None = None,
    ) -> None:
        self.model = vfm
        self.access = vit_access(vfm, pos_interp=pos_interp)
        self.mean, self.std = tuple(mean), tuple(std)
        self._captured: Tensor | None = None
        self._stop = False
        self.handle = self.access.last_block.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self._captured = args[0]
        if self._stop:
            raise _KeysCaptured

    def remove(self) -> None:
        self.handle.remove()

    def prepare(self, clip_images: Tensor, square: bool) -> Tensor:
        """CLIP-normalised crops → the VFM's normalisation, optionally resized to a square of the short side."""
        x = to_vfm_normalization(clip_images.float(), self.mean, self.std)
        if square:
            side = min(x.shape[-2:])
            if x.shape[-2] != side or x.shape[-1] != side:
                x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=False)
        return x.to(self.access.dtype)

    def _run(self, x: Tensor, stop: bool) -> tuple[Tensor, tuple[int, int]]:
        acc = self.access
        tokens, grid = acc.embed(x)
        self._stop = stop
        try:
            tokens = acc.run_blocks(tokens, acc.blocks)
        except _KeysCaptured:
            tokens = None
        finally:
            self._stop = False
        return (tokens if tokens is not None else self._captured), grid

    def keys(self, clip_images: Tensor, square: bool = True) -> tuple[Tensor, tuple[int, int]]:
        """Last-block attention keys of the patch tokens ``(B, h_v, N_v, Dh_v)`` and the VFM grid (cass.md §2.1)."""
        x = self.prepare(clip_images, square)
        last_in, grid = self._run(x, stop=True)
        _, k, _ = self.access.qkv(self.access.to_batch_first(last_in))
        return k[:, :, self.access.num_prefix_tokens:], grid

    def features(self, clip_images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Final-norm output of the last block for the patch tokens, ``(B, C, gh, gw)`` (ProxyCLIP's ``E``)."""
        x = self.prepare(clip_images, square=False)
        tokens, grid = self._run(x, stop=False)
        norm = getattr(self.model, "norm", None)
        tokens = norm(tokens) if norm is not None else tokens
        patches = tokens[:, self.access.num_prefix_tokens:]
        return patches.transpose(1, 2).reshape(patches.shape[0], -1, *grid), grid


def resize_keys(keys: Tensor, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    """Bilinearly resize per-head key maps ``(B, h, Ns, Dh)`` from grid ``src`` to ``dst`` (cass.md §2.2)."""
    if tuple(src) == tuple(dst):
        return keys
    b, h, _, dh = keys.shape
    maps = keys.permute(0, 1, 3, 2).reshape(b, h * dh, *src)
    maps = F.interpolate(maps.float(), size=dst, mode="bilinear", align_corners=False).to(keys.dtype)
    return maps.reshape(b, h, dh, dst[0] * dst[1]).permute(0, 1, 3, 2)


def matching_for_window(matching: Any, cost: Tensor, window: int) -> str | Sequence[int]:
    """The head-matching strategy or explicit assignment of one window (``Config.matching``).

    ``matching`` is a strategy name, one explicit assignment for every window, a sequence of explicit assignments
    indexed by window, or a callable ``fn(cost, window_index)`` returning either of the first two.
    """
    if callable(matching):
        chosen = matching(cost.detach().clone(), window)
        if not isinstance(chosen, (str, Tensor)) and not _is_int_sequence(chosen):
            raise TypeError(
                f"the matching callable returned {chosen!r} for window {window}: return a strategy name or a "
                "sequence of VFM head indices (one per CLIP head)"
            )
        return chosen
    if isinstance(matching, str) or _is_int_sequence(matching):
        return matching
    if window >= len(matching):
        raise ValueError(
            f"matching gives assignments for {len(matching)} windows but window {window} was reached; give one "
            "per window of every image (cass_plugins.windows.window_grid counts them), or a callable"
        )
    return matching[window]


def _is_int_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


class SpectralAttentionHook:
    """CASS spectral object-level context distillation as a last-block component (cass.md §2).

    For every image: VFM keys resized to the CLIP grid and range-matched to the CLIP keys; per-head graphs; top-m
    normalised spectra; Hungarian head matching on ``1 - W``; the matched VFM graph's low-rank approximation with
    dynamic eigenscaling, zero diagonal, range-matched to the CLIP graph, fused with weight ``λ·w``.

    The last matching of every image is kept in :attr:`last_matching` (cost, assignment, weights, ranks, margin).
    """

    def __init__(self, vfm: VFMRunner, config: Config) -> None:
        self.vfm = vfm
        self.config = config
        self.last_matching: list[HeadMatching] = []

    @staticmethod
    def attach(model: nn.Module, vfm: nn.Module, preset: str = "cass-official", **overrides: Any) -> Any:
        """Attach only this component (NACLIP-reduced block + VFM graph; no OPS/OTA) to ``model``.

        Shorthand for ``patch_clip(model, vfm, preset, components=["spectral"], **overrides)``; returns its
        :class:`~cass_plugins.patch.PatchHandle` (``remove()`` / context manager).
        """
        from .patch import patch_clip

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
        """Steps 3-10 of cass.md §2 against ``clip_k`` (VFM keys already on the CLIP grid): the distilled VFM
        graph, fusion weights and matchings."""
        cfg = self.config
        vfm_k = spectral.range_match(vfm_k, clip_k, dims=(1, 2, 3))
        scale = ctx.access.scale  # both graphs use CLIP's Dh^-0.5 (cass.md §9)
        spec_c = spectral.normalize_spectrum(spectral.key_spectrum(clip_k, scale, cfg.spectrum_size))
        spec_v = spectral.normalize_spectrum(spectral.key_spectrum(vfm_k, scale, cfg.spectrum_size))
        cost = spectral.spectral_cost(spec_v, spec_c)  # (B, Hv, Hc)
        solve_dtype = torch.float32 if cfg.solve_dtype == "float32" else torch.float64
        # the official pairing quirk reads C[i, j] with i a CLIP head index: only defined for equal head counts
        pairing = cfg.pairing if cost.shape[1] == cost.shape[2] else "paper"
        matchings = []
        windows = ctx.window_indices or list(range(cost.shape[0]))
        for c, window in zip(cost, windows):  # one (Hv, Hc) cost per crop
            strategy = matching_for_window(cfg.matching, c, window)
            m = match_heads(c, strategy, solve_dtype=solve_dtype, tie_break=cfg.tie_break, pairing=pairing)
            m.window = window
            matchings.append(m)
        assignment = torch.stack([m.assignment for m in matchings]).to(clip_k.device)  # (B, Hc)
        weights = torch.stack([m.weights for m in matchings]).to(clip_k.device, torch.float64)
        # the low rank and its eigenscaling stay in float64 (cass.md §9); the exact paths need only the keys
        matched_k = spectral.gather_heads(vfm_k, assignment).double()  # (B, Hc, N, Dh_v)
        graph = spectral.attention_graph(matched_k, scale) if cfg.lowrank in ("randomized", None) else None
        vfm_graph, ranks = spectral.distilled_vfm_graph(
            graph, vfm_keys=matched_k, scale=scale,
            lowrank=cfg.lowrank, rank=cfg.rank, eigenscaling=cfg.eigenscaling and cfg.lowrank is not None,
            eps=cfg.eigenscale_eps, seed=cfg.lowrank_seed, eta=cfg.energy_eta,
        )
        for i, m in enumerate(matchings):
            m.ranks = None if ranks is None else ranks[i].detach().cpu()
        return vfm_graph, weights, matchings
