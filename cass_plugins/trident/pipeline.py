"""Splice mode of the :class:`~cass_plugins.pipeline.segmenter.Segmenter` and the SAM stages every mode shares.

Flow of one image (docs/spec/trident.md §1, official ``Trident.predict``): load → short-side resize →
CLIP-normalise → re-resize to multiples of the patch (§2.1) → the whole image's prior (components that read it)
→ every window in one forward through the patched last block (§2.2, §3) → the window outputs spliced before the
head (§4) → ``cass_aggregate_features`` (SAM aggregation, §5–6) → ``ln_post``/``proj`` → text side (§6) → one
bilinear resize to the original size → logit scale, softmax, synonym max, background threshold (§7) →
``cass_refine_labels`` (SAM refinement, §8).

SAM sees the original image, rounded up to multiples of the CLIP patch (§5.1); one encoder pass per image serves
the aggregation and the refinement (:class:`SamImage`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from cass_plugins.core.hookspecs import LabelContext, SplicedContext
from cass_plugins.core.patch import PatchHandle, encode_tokens
from cass_plugins.core.registry import REGISTRY
from cass_plugins.pipeline.image import ImageSource, load_image
from cass_plugins.pipeline.result import SegmentationResult
from cass_plugins.pipeline.segmenter import PreparedImage
from cass_plugins.pipeline.vocabulary import Vocabulary
from cass_plugins.pipeline.windows import window_grid

from .splice import align_to_clip_grid, resize_to_patch_multiple, splice_windows

if TYPE_CHECKING:  # pragma: no cover
    from cass_plugins.core.config import Config
    from cass_plugins.pipeline.segmenter import Segmenter

__all__ = ["SamImage", "check_sam", "refine_decided_labels", "sam_for_image", "sam_users", "segment_spliced"]


class SamImage:
    """One image's SAM encoding, computed on first call and then shared (one encoder pass per image)."""

    def __init__(self, sam: Any, image: Tensor, *, round_to: int, split_halves: bool, keep_for_refine: bool) -> None:
        self.sam, self.image = sam, image
        self.options = {"round_to": round_to, "split_halves": split_halves, "keep_for_refine": keep_for_refine}
        self._encoding: Any = None

    def __call__(self) -> Any:
        if self._encoding is None:
            self._encoding = self.sam.encode(self.image, **self.options)
        return self._encoding


def sam_users(config: Config) -> list[str]:
    """The switched-on components that read SAM (``ComponentSpec.needs_sam``)."""
    return [name for name in config.components if REGISTRY.component(name).needs_sam]


def check_sam(config: Config, sam: Any) -> None:
    """Refuse a SAM model nothing uses, SAM components without one, and refinement with an encoder-only SAM."""
    users = sam_users(config)
    if sam is None and users:
        raise ValueError(
            f"{', '.join(users)} need{'s' if len(users) == 1 else ''} a SAM model: pass "
            "sam=cass_plugins.load_sam('vit_b', checkpoint='sam_vit_b_01ec64.pth') (cass-segment/cass-eval: "
            "--sam-weights FILE), or switch them off"
        )
    if sam is not None and not users:
        raise ValueError(
            "a SAM model was given but no component uses it: switch on sam_aggregate (mode='splice') and/or "
            "sam_refine (e.g. preset='trident'), or drop sam="
        )
    if "sam_refine" in users and not getattr(sam, "can_refine", False):
        raise ValueError(
            "sam_refine needs SAM's prompt encoder and mask decoder, which a timm SAM encoder lacks: load SAM with "
            '`pip install "cass_plugins[sam]"` and load_sam(..., backend="segment_anything"), or switch sam_refine off'
        )


def sam_for_image(segmenter: Segmenter, image: Tensor) -> SamImage | None:
    """The lazily encoded SAM view of ``image`` (``(3, H0, W0)`` uint8, the original) for this Segmenter's config."""
    if segmenter.sam is None:
        return None
    config = segmenter.config
    split = "sam_aggregate" in config.components and config["sam_aggregate"].split == "halves"
    return SamImage(
        segmenter.sam, image, round_to=segmenter.handle.access.patch_size[0], split_halves=split,
        keep_for_refine="sam_refine" in config.components,
    )


def refine_decided_labels(
    handle: PatchHandle, labels: Tensor, probs: Tensor, image: Tensor, sam: SamImage | None, record: dict[str, Any]
) -> Tensor:
    """Run ``cass_refine_labels`` on the decided labels (§8); what the components record joins ``record``."""
    ctx = LabelContext(labels=labels, probs=probs, image=image, sam=sam)
    handle.pm.hook.cass_refine_labels(ctx=ctx)
    record.update(ctx.record)
    return ctx.labels


@torch.no_grad()
def segment_spliced(
    segmenter: Segmenter, image: ImageSource, vocabulary: Vocabulary, *, maps: bool = True
) -> SegmentationResult:
    """Segment one image in splice mode (module docstring; called by ``Segmenter.segment``)."""
    cfg = segmenter.config.pipeline
    handle = segmenter.handle
    access = handle.access
    patch = access.patch_size[0]
    if access.patch_size[0] != access.patch_size[1]:
        raise ValueError(f"splice mode needs square patches, got {access.patch_size}")
    if cfg.crop % patch or cfg.stride % patch:
        raise ValueError(
            f"splice mode needs the crop ({cfg.crop}) and stride ({cfg.stride}) to be multiples of the CLIP patch "
            f"size {patch}, so every window starts on a patch (docs/spec/trident.md §2.2)"
        )
    if isinstance(image, PreparedImage):
        raise TypeError("splice mode reads the original image (SAM sees it unresized): pass the image itself, "
                        "not a PreparedImage")
    rgb = load_image(image)
    x, original = segmenter.preprocess(rgb)  # the short-side resize and normalisation of every mode
    x = resize_to_patch_multiple(x, patch, cfg.crop)
    text = segmenter.text_embeddings(vocabulary)
    handle.begin_image(x, text, vocabulary=vocabulary, embed_text=segmenter._embed_names)

    height, width = x.shape[-2:]
    windows = window_grid(height, width, cfg.crop, cfg.stride)
    # every window in one forward: Trident's proxy graph takes mean(S) over all of them (T-Q1, §2.2)
    crops = torch.cat([x[:, :, y1:y2, x1:x2] for (y1, y2, x1, x2) in windows])
    tokens = encode_tokens(segmenter.model, crops)
    handle.record_windows(windows)
    window_maps, ratio = align_to_clip_grid(tokens.patches.permute(0, 3, 1, 2), (cfg.crop // patch, cfg.crop // patch))
    if patch % ratio:
        raise ValueError(f"the block's output grid is {ratio}x the CLIP grid, which does not divide the patch {patch}")
    step = patch // ratio
    boxes = [(y1 // step, y2 // step, x1 // step, x2 // step) for (y1, y2, x1, x2) in windows]
    spliced = splice_windows(window_maps, boxes, (height // step, width // step))

    sam = sam_for_image(segmenter, rgb)
    sctx = SplicedContext(features=spliced, image=rgb, sam=sam)
    handle.pm.hook.cass_aggregate_features(ctx=sctx)
    dim, gh, gw = sctx.features.shape
    # ln_post and proj on the spliced (and aggregated) tokens: the head runs after the splice (T-Q3, P4)
    projected = access.head(sctx.features.reshape(dim, gh * gw).T[None].to(access.dtype))
    features = projected.reshape(1, gh, gw, -1)
    logits = handle.text_logits(features, text, vocabulary=vocabulary, windows=[(0, height, 0, width)],
                                record_windows=False)[0]
    ictx = handle.end_image()
    record = {**handle.image_record, **ictx.record, **sctx.record, "splice_grid": (gh, gw)}
    # §6 step 5 and §7: one bilinear resize from the aggregated grid straight to the original size, then the same
    # decision and label refiners (§8) as every mode, with the SAM pass the aggregation already made
    return segmenter._finish(logits, x, original, vocabulary, ictx.prob_thd, record, maps, image=rgb, sam=sam)
