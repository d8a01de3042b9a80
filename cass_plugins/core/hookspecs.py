"""Hook specifications (pluggy style: documented empty functions), the one ``hookimpl`` marker, and the contexts
the hooks receive.

A patched model owns a :class:`pluggy.PluginManager` holding exactly one *baseline* plugin (how the last block
computes its patch tokens: NACLIP, SCLIP, ...) and any number of *component* plugins (CASS spectral distillation,
the presence prior, the text adjustment, CDAM, third-party additions). The last-block forward hook calls, in order:

1. ``cass_attention_graphs`` (baseline, first result) - the pre-softmax patch attention graphs;
2. ``cass_refine_graphs`` (components) - edit ``ctx.graphs`` in place (e.g. fuse the VFM graph);
3. ``cass_block_output`` (baseline, first result) - the block's patch-token output from the graphs.

The text side (:meth:`~cass_plugins.core.patch.PatchHandle.logits`, used by the ``Segmenter``) calls
``cass_begin_image`` once per image (before its windows), ``cass_adjust_text`` and ``cass_refine_logits`` per window,
and ``cass_end_image`` once per image (after its windows, before post-processing; e.g. to set a per-image
background threshold).

Two image-level hooks follow: ``cass_aggregate_features`` on the spliced pre-head map of splice mode (Trident's
SAM aggregation, docs/spec/trident.md §6), and ``cass_refine_labels`` on the decided labels (Trident's SAM
prompt refinement, §8; any mode).

Built-in and third-party plugins register baselines, components and presets through ``cass_register``
(:mod:`cass_plugins.core.registry`); third-party packages are found through the ``cass_plugins`` entry-point group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pluggy
from torch import Tensor

PROJECT = "cass_plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = [
    "hookspec", "hookimpl", "BlockContext", "TextContext", "LogitsContext", "ImageContext", "SplicedContext",
    "LabelContext", "CassSpec",
    "make_plugin_manager",
]


@dataclass
class BlockContext:
    """What the last-block hook knows about one forward pass (all tensors batch-first).

    Attributes:
        access: the :class:`~cass_plugins.backbone.access.ViTAccess` of the CLIP tower.
        x: input tokens of the last block ``(B, T, D)``.
        block_output: the unmodified block's output ``(B, T, D)`` (its CLS row is the image embedding).
        q, k, v: ``(B, h, T, Dh)`` of the last block, prefix tokens included.
        grid: CLIP patch grid ``(gh, gw)``.
        images: the CLIP-normalised crops that entered the model (``None`` if not observed).
        graph_tokens: ``"all"`` (CLS takes part in the attention) or ``"patches"``.
        graphs: the baseline's pre-softmax attention graphs ``(B, h|1, Tq, Tk)``, edited by components.
        graph_keys: optional, one entry per graph: the ``(B, h, N, Dh)`` tokens ``F`` whose scaled Gram matrix
            ``s·F Fᵀ`` the graph is (``q`` for a q-q graph); spectral distillation matches heads and range-matches
            the VFM keys against them. ``None`` (or a ``None`` entry) means the keys ``k``.
        patch_output: ``(B, N', D)`` set by ``cass_block_output``.
        output_grid: grid of ``patch_output`` (differs from ``grid`` for ProxyCLIP).
        record: per-forward inspection data (e.g. ``"matching"``) copied to the patch handle.
        window_indices: one index per batch row: the crops this patch has seen before it, counted since the
            patch was made or :meth:`~cass_plugins.core.patch.PatchHandle.reset_windows` was last called (the
            :class:`~cass_plugins.pipeline.segmenter.Segmenter` resets it at every image, so they are the image's window
            numbers in raster order).
    """

    access: Any
    x: Tensor
    block_output: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    grid: tuple[int, int]
    images: Tensor | None = None
    graph_tokens: str = "patches"
    graphs: list[Tensor] = field(default_factory=list)
    graph_keys: list[Tensor | None] | None = None
    patch_output: Tensor | None = None
    output_grid: tuple[int, int] | None = None
    record: dict[str, Any] = field(default_factory=dict)
    window_indices: list[int] = field(default_factory=list)

    @property
    def num_prefix(self) -> int:
        return self.access.num_prefix_tokens

    @property
    def patch_k(self) -> Tensor:
        return self.k[:, :, self.num_prefix:]

    @property
    def patch_v(self) -> Tensor:
        return self.v[:, :, self.num_prefix:]


@dataclass
class TextContext:
    """One window's text side: ``text`` ``(B, Q, d)`` may be replaced by components."""

    features: Tensor  # (B, gh, gw, d) projected patch features of the window
    text: Tensor  # (B, Q, d) per-window text embeddings (start: the vocabulary's)
    prior: Tensor | None  # (B, Q) presence prior cosine scores, if computed
    vocabulary: Any
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class LogitsContext:
    """One window's logits ``(B, Q, gh, gw)``, refined in place by components."""

    logits: Tensor
    features: Tensor
    text: Tensor
    prior: Tensor | None
    record: dict[str, Any] = field(default_factory=dict)
    windows: list[tuple[int, int, int, int]] | None = None  # (y1, y2, x1, x2) per batch row; None: whole image


@dataclass
class ImageContext:
    """One image of the segmentation pipeline, seen before its windows and again after them.

    Attributes:
        vocabulary: the image's :class:`~cass_plugins.pipeline.vocabulary.Vocabulary`.
        text: ``(Q, d)`` L2-normalised query embeddings of the vocabulary.
        embed_text: ``names -> (n, d)`` embeds extra prompts with the pipeline's text tower, tokenizer and templates.
        prob_thd: the background threshold post-processing applies; components may replace it in ``cass_end_image``.
        record: per-image inspection data, copied into the segmentation result's ``record``.
    """

    vocabulary: Any
    text: Tensor
    embed_text: Callable[[Sequence[str]], Tensor]
    prob_thd: float
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class SplicedContext:
    """One image's window outputs spliced before the head (splice mode, docs/spec/trident.md §4).

    Attributes:
        features: ``(D, gh, gw)`` the spliced last-block map before ``ln_post``/``proj``; components may replace it
            with a map on another grid (Trident's SAM aggregation: SAM's valid grid, §6).
        image: ``(3, H0, W0)`` uint8 RGB, the original image.
        sam: returns the image's SAM encoding (computed on first call, one encoder pass per image shared with the
            label refinement); ``None`` without a SAM model.
        record: per-image inspection data.
    """

    features: Tensor
    image: Tensor
    sam: Callable[[], Any] | None
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class LabelContext:
    """One image's decided labels at the original size, refined in place by components (SAM refinement, §8).

    Attributes:
        labels: ``(H0, W0)`` int64 class indices after the background threshold.
        probs: ``(C, H0, W0)`` per-class probabilities (after the synonym max).
        image: ``(3, H0, W0)`` uint8 RGB, the original image.
        sam: as :class:`SplicedContext`.
        record: per-image inspection data.
    """

    labels: Tensor
    probs: Tensor
    image: Tensor
    sam: Callable[[], Any] | None
    record: dict[str, Any] = field(default_factory=dict)


class CassSpec:
    """Hook specifications (documented empty functions, pluggy style)."""

    @hookspec
    def cass_register(self, registry: "Registry") -> None:
        """Register baselines (``registry.add_baseline``), components (``add_component``) and presets
        (``add_preset``); called once per plugin module when the registry first loads."""

    @hookspec(firstresult=True)
    def cass_attention_graphs(self, ctx: BlockContext) -> list[Tensor] | None:
        """Return the baseline's pre-softmax attention graphs for the patch tokens (first result wins)."""

    @hookspec
    def cass_refine_graphs(self, ctx: BlockContext) -> None:
        """Edit ``ctx.graphs`` in place before the baseline turns them into attention (e.g. VFM fusion)."""

    @hookspec(firstresult=True)
    def cass_block_output(self, ctx: BlockContext) -> Tensor | None:
        """Return the last block's patch-token output ``(B, N', D)`` from ``ctx.graphs`` (first result wins)."""

    @hookspec
    def cass_adjust_text(self, ctx: TextContext) -> None:
        """Replace ``ctx.text`` with per-window adjusted text embeddings (e.g. OTA)."""

    @hookspec
    def cass_refine_logits(self, ctx: LogitsContext) -> None:
        """Replace ``ctx.logits`` with refined window logits (e.g. the presence prior)."""

    @hookspec
    def cass_begin_image(self, ctx: ImageContext) -> None:
        """Called once per image before its windows (e.g. to hand the vocabulary's text to a block component)."""

    @hookspec
    def cass_end_image(self, ctx: ImageContext) -> None:
        """Called once per image after its windows, before post-processing (e.g. to set ``ctx.prob_thd``)."""

    @hookspec
    def cass_aggregate_features(self, ctx: SplicedContext) -> None:
        """Replace ``ctx.features``, the spliced pre-head map of splice mode (e.g. Trident's SAM aggregation)."""

    @hookspec
    def cass_refine_labels(self, ctx: LabelContext) -> None:
        """Replace ``ctx.labels`` after post-processing (e.g. Trident's SAM prompt refinement)."""


def make_plugin_manager() -> pluggy.PluginManager:
    """A plugin manager that knows the hook specifications."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(CassSpec)
    return pm
