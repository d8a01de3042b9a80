"""``Segmenter``: one image + a vocabulary → label map, per-class probabilities and raw logits; ``segment_many``:
the same for a stream of images, several per forward.

Flow (docs/spec/cass.md §5, docs/spec/protocol.md §6-8): load → resize short side → CLIP-normalise → whole-image
prior (once, :meth:`PatchHandle.begin_image`) → windows (batched) → :meth:`PatchHandle.logits` (patched CLIP ∥ VFM →
dense features → text components → cosine logits → logit components) → accumulate → original size → PAMR
(optional) → logit scale, softmax, synonyms max, background threshold.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from cass_plugins.core.config import Config
from cass_plugins.core.hookspecs import BlockContext, hookimpl
from cass_plugins.core.patch import PatchHandle, cosine_prior, encode_dense, image_embedding, non_finite_message, patch_clip
from cass_plugins.pipeline.image import ImageSource, clip_normalize, load_image, resize_short_side
from cass_plugins.pipeline.pamr import apply_pamr
from cass_plugins.pipeline.result import SegmentationResult
from cass_plugins.pipeline.postprocess import labels_at_size, logits_to_labels, upsample_banded, upsample_logits
from cass_plugins.pipeline.text import default_tokenizer, encode_text
from cass_plugins.pipeline.vocabulary import Vocabulary
from cass_plugins.pipeline.windows import SlidingWindowAccumulator, iter_window_batches, window_grid

__all__ = ["Segmenter", "SegmentationResult", "PreparedImage", "prepare_image", "PRECISIONS"]

#: ``Segmenter(precision=...)`` / ``--precision``: the dtype both towers run in.
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class PreparedImage:
    """An image loaded, resized (short side) and CLIP-normalised: what :func:`prepare_image` returns and
    :meth:`Segmenter.segment_many` accepts, so decoding can run elsewhere (a ``DataLoader`` worker).

    Attributes:
        x: ``(1, 3, h, w)`` float32, CLIP-normalised, at the resized size.
        original: ``(H, W)`` of the decoded image (the labels' size).
    """

    x: Tensor
    original: tuple[int, int]

    def pin_memory(self) -> "PreparedImage":
        """Page-locked copy (``DataLoader(pin_memory=True)`` calls this), for a non-blocking copy to the GPU."""
        return PreparedImage(self.x.pin_memory(), self.original)


def prepare_image(image: ImageSource, short_side: int, max_long_side: int) -> PreparedImage:
    """Load, resize the short side and CLIP-normalise on the CPU (protocol.md §6); picklable for worker processes."""
    rgb = load_image(image)
    original = (int(rgb.shape[-2]), int(rgb.shape[-1]))
    # uint8 in → uint8 out (rounded like the reference's cv2.resize), then normalised (protocol.md §6)
    resized = resize_short_side(rgb, short_side, max_long_side)
    return PreparedImage(clip_normalize(resized)[None], original)


class _WindowNumbers:
    """Gives each row of a forward its own image's window number (``BlockContext.window_indices``) when
    :meth:`Segmenter.segment_many` puts windows of several images into one forward, so per-window
    ``spectral.matching`` lists and callables see the same numbers as :meth:`Segmenter.segment`."""

    def __init__(self) -> None:
        self.pending: list[int] | None = None

    @hookimpl(wrapper=True)
    def cass_attention_graphs(self, ctx: BlockContext) -> Any:
        # the first hook of the block: every later hook of this forward sees the numbers
        if self.pending is not None:
            if len(self.pending) != ctx.x.shape[0]:
                raise RuntimeError(f"{len(self.pending)} window numbers for a forward of {ctx.x.shape[0]} crops")
            ctx.window_indices = list(self.pending)
        return (yield)


class Segmenter:
    """Training-free open-vocabulary segmentation of single images with a patched CLIP.

    Args:
        clip_model: an open_clip / OpenAI-clip-style CLIP model (image and text towers).
        vfm: the VFM for spectral distillation (timm ViT, e.g. DINO B/8); ``None`` switches it off.
        vocabulary: default classes (any form :meth:`Vocabulary.parse` accepts).
        preset, dataset, baseline, components, plugins, **overrides: as :func:`~cass_plugins.patch_clip`.
        tokenizer: text tokenizer; default: open_clip's CLIP BPE tokenizer.
        device: move the models there (default: where the CLIP model is).
        text_cache: keep text embeddings in the on-disk cache (:mod:`cass_plugins.pipeline.cache`); ``False``: no caching.
        progress: progress bar while encoding text (``None``: only on a terminal and for runs over a second).
        sam: a :class:`~cass_plugins.backbone.sam.SamBackbone` (:func:`~cass_plugins.load_sam`) for Trident and the
            ``sam_aggregate`` / ``sam_refine`` components; refused when none of them is switched on.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``: cast both towers (in place, like ``device``) to that dtype;
            the spectral math stays float32 on CUDA (float64 on the CPU). ``None``: leave the models' dtype.
        compile: ``torch.compile`` every transformer block of both towers except the patched last ones (whose
            hooks run the components and the host-side head matching); undone by :meth:`close`. Off by default:
            compilation takes minutes on a CPU and pays off only over many images (see docs/benchmarks.md).

    The model stays patched until :meth:`close` (or the end of a ``with`` block).
    """

    def __init__(
        self,
        clip_model: nn.Module,
        vfm: nn.Module | None = None,
        *,
        vocabulary: Any = None,
        preset: str | Config = "cass-official",
        dataset: str | None = None,
        baseline: str | None = None,
        components: Iterable[str] | None = None,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        plugins: Sequence[object] = (),
        text_cache: bool = True,
        progress: bool | None = None,
        sam: Any = None,
        precision: str | None = None,
        compile: bool = False,
        **overrides: Any,
    ) -> None:
        # Parse the vocabulary and check the options first: a bad one must not leave the model patched.
        default_vocabulary = _parse_vocabulary(vocabulary) if vocabulary is not None else None
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: use one of {sorted(PRECISIONS)} (or None to keep the models' dtype)")
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {compile!r}")
        if device is not None:
            clip_model = clip_model.to(device)
            vfm = vfm.to(device) if vfm is not None else None
            if sam is not None and hasattr(sam, "model"):
                sam.model.to(device)  # SAM keeps its own precision (load_sam(precision=...))
        if precision is not None:
            clip_model = clip_model.to(PRECISIONS[precision])
            vfm = vfm.to(PRECISIONS[precision]) if vfm is not None else None
        self.model = clip_model.eval()
        self.vfm = vfm.eval() if vfm is not None else None
        self.handle: PatchHandle = patch_clip(
            clip_model, vfm, preset, dataset=dataset, baseline=baseline, components=components, plugins=plugins,
            **overrides,
        )
        self.config: Config = self.handle.config
        try:
            from cass_plugins.trident.pipeline import check_sam  # the SAM stages live with Trident

            check_sam(self.config, sam)
            sam_device = getattr(sam, "device", None)
            clip_device = next(clip_model.parameters()).device
            if sam_device is not None and torch.device(sam_device) != clip_device:
                raise ValueError(
                    f"SAM is on {sam_device} but the CLIP model on {clip_device}: pass device= to the Segmenter "
                    "(it moves all the models) or load_sam(..., device=...)"
                )
            self.tokenizer = tokenizer if tokenizer is not None else default_tokenizer(None)
        except BaseException:
            self.handle.remove()  # leave the model as we found it
            raise
        self.device = next(clip_model.parameters()).device
        self.vocabulary = default_vocabulary
        self.text_cache, self.progress = text_cache, progress
        self.sam = sam
        self.precision = precision
        self._window_numbers: _WindowNumbers | None = None
        self._compiled: list[nn.Module] = []
        if compile:
            self._compile_towers()

    # ------------------------------------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Unpatch the model (and undo ``compile=True``)."""
        for block in self._compiled:
            block._compiled_call_impl = None  # what nn.Module.compile set: back to the eager __call__
        self._compiled.clear()
        self.handle.remove()

    def _compile_towers(self) -> None:
        """``nn.Module.compile`` on every block of both towers but the last, which carries the patch's hooks."""
        towers = [self.handle.access.blocks]
        if self.handle.vfm is not None:
            towers.append(self.handle.vfm.access.blocks)
        for blocks in towers:
            for block in list(blocks)[:-1]:
                block.compile()
                self._compiled.append(block)

    def __enter__(self) -> "Segmenter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """The resolved configuration (every knob) as JSON."""
        return self.config.describe()

    # ------------------------------------------------------------------------------------------------ text
    def text_embeddings(self, vocabulary: Vocabulary) -> Tensor:
        """``(Q, d)`` float32 query embeddings (cached per vocabulary)."""
        with torch.no_grad():
            return encode_text(self.model, self.tokenizer, vocabulary, device=self.device, cache=self.text_cache,
                               progress=self.progress)

    # ------------------------------------------------------------------------------------------------ images
    def preprocess(self, image: ImageSource | PreparedImage) -> tuple[Tensor, tuple[int, int]]:
        """Load, resize (short side) and CLIP-normalise → ``(1, 3, H, W)`` float32 on the device and the original
        size (a :class:`PreparedImage` is only moved: non-blocking when pinned)."""
        prepared = self.prepare(image)
        return prepared.x.to(self.device, non_blocking=True), prepared.original

    def prepare(self, image: ImageSource | PreparedImage) -> PreparedImage:
        """:func:`prepare_image` with this configuration's short side (on the CPU); a PreparedImage as it is."""
        if isinstance(image, PreparedImage):
            return image
        cfg = self.config.pipeline
        return prepare_image(image, cfg.short_side, cfg.max_long_side)

    @torch.no_grad()
    def segment(self, image: ImageSource | PreparedImage, vocabulary: Any = None, *,
                maps: bool = True) -> SegmentationResult:
        """Segment one image (path, PIL image, numpy array, tensor or :class:`PreparedImage`) with ``vocabulary``
        (or the default one). Many images: :meth:`segment_many`.

        Args:
            image: the image.
            vocabulary: classes for this call (any form :meth:`Vocabulary.parse` accepts); default: the Segmenter's.
            maps: ``True``: the result also holds the ``(C, H, W)`` probabilities and ``(Q, H, W)`` logits at the
                original size. ``False``: only the labels are computed at that size, in bands of rows (each band
                upsampled, softmaxed and decided on its own; SCLIP's area rule takes a second pass), so neither map
                is ever held; ``probs`` is ``None`` and ``logits`` stays at the resized input's size. The labels are
                identical to ``maps=True``. With PAMR (``pipeline.pamr_steps > 0``), which needs the full-resolution
                logits, ``maps=False`` still builds them (the memory is not bounded) and only drops them from the
                result.

        Memory, measured (growth of the peak RSS over the call in a fresh process, tiny CLIP at ``short_side=64``,
        150 classes, 3000×2000 image, so nearly all of it is post-processing; one run on a shared 2-core machine,
        ``resource.getrusage`` around the call): ``maps=True`` 7.4 GB, ``maps=False`` 0.35 GB. The bounded path holds the labels
        (8 bytes per pixel: 192 MB at 6000×4000) plus a few 32 MiB band temporaries, so ~0.5 GB at 6000×4000 × 150
        classes, where ``maps=True`` needs ~30 GB (logits and probabilities at 14.4 GB each). With an area threshold
        (``area_thd``) the bounded path computes every band twice.
        """
        vocab = self._vocabulary_for_call(vocabulary)
        cfg = self.config.pipeline
        if cfg.mode == "splice":  # Trident's splice-then-segment (docs/spec/trident.md)
            from cass_plugins.trident.pipeline import segment_spliced

            return segment_spliced(self, image, vocab, maps=maps)
        handle = self.handle
        rgb = None
        if handle.refines_labels:  # SAM refinement reads the original image (docs/spec/trident.md §8)
            if isinstance(image, PreparedImage):
                raise TypeError("sam_refine reads the original image: pass the image itself, not a PreparedImage")
            rgb = load_image(image)
            image = rgb
        x, original = self.preprocess(image)
        text = self.text_embeddings(vocab)
        whole = cfg.mode == "whole"
        # the whole image's prior once (cass.md §3); in whole mode the single pass carries its own
        handle.begin_image(None if whole else x, text, vocabulary=vocab, embed_text=self._embed_names)
        if whole:
            box = [(0, x.shape[-2], 0, x.shape[-1])]
            logits = handle.logits(x, text, vocabulary=vocab, whole_image=True, windows=box)
            # two_step_via: grid → resized input here, input → original below (two bilinear steps)
            logits = upsample_logits(logits[0], tuple(x.shape[-2:]))
        else:
            h, w = x.shape[-2:]
            acc = SlidingWindowAccumulator(len(vocab.queries), h, w, device=x.device, dtype=torch.float32)
            windows = window_grid(h, w, cfg.crop, cfg.stride)
            for batch in iter_window_batches(windows, cfg.window_batch):
                crops = torch.cat([x[:, :, y1:y2, x1:x2] for (y1, y2, x1, x2) in batch])
                acc.add_batch(batch, handle.logits(crops, text, vocabulary=vocab, windows=batch))
            logits = acc.result()

        ictx = handle.end_image()  # e.g. CDAM's per-image entropy threshold
        record = {**handle.image_record, **ictx.record}
        return self._finish(logits, x, original, vocab, ictx.prob_thd, record, maps, image=rgb)

    def _finish(self, logits: Tensor, x: Tensor, original: tuple[int, int], vocab: Vocabulary,
                prob_thd: float | None, record: dict[str, Any], maps: bool, *, image: Tensor | None = None,
                sam: Any = None) -> SegmentationResult:
        """Post-processing of one image's ``(Q, h, w)`` logits (protocol.md §8), then the label refiners
        (``cass_refine_labels``: SAM refinement) on ``image``, the ``(3, H0, W0)`` uint8 original, with ``sam``
        the image's SAM view when the caller already made one (one encoder pass per image)."""
        cfg = self.config.pipeline
        q2c = vocab.query_to_class_tensor(logits.device)
        decision = dict(logit_scale=cfg.logit_scale, prob_thd=prob_thd, area_thd=cfg.area_thd)
        refine = self.handle.refines_labels
        if not maps and cfg.pamr_steps == 0 and not refine:
            labels = labels_at_size(logits, original, q2c, **decision)
            return SegmentationResult(labels.cpu(), None, logits.cpu(), vocab, record)
        # the same bands of rows as labels_at_size: the same bits, so both give the same labels
        full = upsample_banded(logits, original)
        if cfg.pamr_steps > 0:
            guide = F.interpolate(x.float(), size=original, mode="bilinear", align_corners=False)
            full = apply_pamr(guide, full[None], cfg.pamr_steps, cfg.pamr_dilations)[0]
        labels, probs = logits_to_labels(full, q2c, **decision)
        if refine:
            from cass_plugins.trident.pipeline import refine_decided_labels, sam_for_image

            if image is None:
                raise TypeError("sam_refine reads the original image: pass the image itself, not a PreparedImage")
            sam = sam if sam is not None else sam_for_image(self, image)
            labels = refine_decided_labels(self.handle, labels, probs, image, sam, record)
        if not maps:
            return SegmentationResult(labels.cpu(), None, logits.cpu(), vocab, record)
        return SegmentationResult(labels.cpu(), probs.cpu(), full.cpu(), vocab, record)

    def _vocabulary_for_call(self, vocabulary: Any) -> Vocabulary:
        if not self.handle.active:
            raise RuntimeError("this Segmenter was closed (its model is unpatched); create a new one")
        vocab = _parse_vocabulary(vocabulary) if vocabulary is not None else self.vocabulary
        if vocab is None:
            raise ValueError("no vocabulary: pass vocabulary=['cat', 'dog', ...] here or to Segmenter(...)")
        return vocab

    # ------------------------------------------------------------------------------------------------ many images
    def segment_many(
        self,
        images: Iterable[ImageSource | PreparedImage],
        vocabulary: Any = None,
        *,
        batch_size: int = 8,
        maps: bool = True,
    ) -> Iterator[SegmentationResult]:
        """Segment a stream of images, the windows of ``batch_size`` images per forward; results in input order.

        Each result equals :meth:`segment` of that image alone (logits to float rounding: a batched matmul may
        round differently; ``record`` holds the image's own windows, head matchings with the image's own window
        numbers, and OTA clusters). Lazy: images are read ``batch_size`` at a time and each batch's results are
        yielded as soon as it is done, so memory stays bounded for long iterables.

        Per batch: the presence priors of all its images (one unpatched forward per image size), then every window
        of every image, grouped by window size, in forwards of up to ``pipeline.window_batch × batch_size``
        windows (CLIP ∥ VFM, the components' block side), then per image the text side (``cass_begin_image``,
        OTA, cosine logits, OPS, ``cass_end_image``) on that image's rows, in :meth:`segment`'s window order.
        Block-side components must treat the rows of a forward independently (as batched windows already
        require). Before a batch's forwards ``cass_begin_image`` runs once with the vocabulary and no image, for
        block components that read the text (CDAM).

        Run one image at a time through :meth:`segment` instead: ``pipeline.mode='splice'`` (Trident builds its
        one map from all windows of an image), and third-party plugins that implement both a block hook and
        ``cass_begin_image`` / ``cass_end_image`` (their block side may hold per-image state).

        Args:
            images: paths, PIL images, arrays, tensors (each one image, as :meth:`segment` takes), or
                :class:`PreparedImage` (already loaded and resized, e.g. by ``DataLoader`` workers; a pinned one is
                copied to the GPU without blocking).
            vocabulary: classes for every image; default: the Segmenter's.
            batch_size: images per batch (≥ 1).
            maps: as :meth:`segment`.

        Yields:
            one :class:`SegmentationResult` per image, in order.

        Raises:
            TypeError: ``images`` is a single image (a path, array or tensor) rather than an iterable of images.
            ValueError: ``batch_size`` < 1, no vocabulary.
        """
        vocab = self._vocabulary_for_call(vocabulary)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int (images per batch), got {batch_size!r}")
        if isinstance(images, (str, bytes, os.PathLike, Image.Image, np.ndarray, Tensor, PreparedImage)):
            raise TypeError(
                f"segment_many takes an iterable of images, got one {type(images).__name__}: pass a list "
                "(segment_many([image, ...])) or call segment(image)"
            )
        return self._segment_stream(iter(images), vocab, batch_size, maps)

    def segment_video(self, frames_or_path: Any, vocabulary: Any = None, **kwargs: Any) -> Iterator[Any]:
        """Segment a video file or an iterable of frames with temporal consistency: see
        :func:`cass_plugins.video.segment.segment_video` (same arguments after the Segmenter; docs/video.md)."""
        from cass_plugins.video.segment import segment_video

        return segment_video(self, frames_or_path, vocabulary, **kwargs)

    def _segment_stream(self, images: Iterator[Any], vocab: Vocabulary, batch_size: int,
                        maps: bool) -> Iterator[SegmentationResult]:
        if not self.batches_images:
            for image in images:
                if isinstance(image, PreparedImage) and (self.config.pipeline.mode not in ("slide", "whole")
                                                         or self.handle.refines_labels):
                    raise TypeError(f"pipeline.mode={self.config.pipeline.mode!r} or sam_refine read each image from "
                                    "its source (for SAM): pass the images themselves, not PreparedImage")
                yield self.segment(image, vocab, maps=maps)
            return
        text = self.text_embeddings(vocab)
        forward_batch = self.config.pipeline.window_batch * batch_size
        while True:
            chunk = list(islice(images, batch_size))
            if not chunk:
                return
            prepared = [self.prepare(im) for im in chunk]
            yield from self._segment_prepared(prepared, vocab, text, maps, forward_batch)

    @property
    def batches_images(self) -> bool:
        """Whether :meth:`segment_many` puts windows of several images into one forward (else it runs
        :meth:`segment` per image: splice mode, third-party per-image block plugins)."""
        if self.config.pipeline.mode not in ("slide", "whole") or self.handle.refines_labels:
            return False  # splice: Trident's own per-image pipeline; SAM refinement: per image, on the original
        hooks = self.handle.pm.hook
        per_image = {id(impl.plugin) for name in ("cass_begin_image", "cass_end_image")
                     for impl in getattr(hooks, name).get_hookimpls()}
        for name in ("cass_attention_graphs", "cass_refine_graphs", "cass_block_output"):
            for impl in getattr(hooks, name).get_hookimpls():
                if id(impl.plugin) in per_image and not type(impl.plugin).__module__.startswith("cass_plugins."):
                    return False
        return True

    def _segment_prepared(self, prepared: Sequence[PreparedImage], vocab: Vocabulary, text: Tensor, maps: bool,
                          forward_batch: int) -> list[SegmentationResult]:
        """One batch of :meth:`segment_many`: shared forwards, then each image's text side and post-processing."""
        cfg = self.config.pipeline
        handle = self.handle
        whole = cfg.mode == "whole"
        xs = [p.x.to(self.device, non_blocking=True) for p in prepared]
        use_image_prior = not whole and handle.needs_prior and cfg.prior_source == "image"
        priors = self._image_priors(xs, text) if use_image_prior else [None] * len(xs)

        # every image's windows in segment()'s order (batches of one size), numbered as segment() numbers them
        plans: list[list[list[tuple[int, int, int, int]]]] = []
        slots: dict[tuple[int, int], list[tuple[int, int, tuple[int, int, int, int]]]] = {}
        for i, x in enumerate(xs):
            h, w = x.shape[-2:]
            batches = [[(0, h, 0, w)]] if whole else list(
                iter_window_batches(window_grid(h, w, cfg.crop, cfg.stride), cfg.window_batch))
            plans.append(batches)
            number = 0
            for batch in batches:
                for box in batch:
                    slots.setdefault((box[1] - box[0], box[3] - box[2]), []).append((i, number, box))
                    number += 1

        # components whose block side reads the vocabulary (CDAM) take it before the forwards
        handle.begin_image(None, text, vocabulary=vocab, embed_text=self._embed_names)
        numbers = self._numbering()
        rows: dict[tuple[int, int], tuple[Tensor, Tensor, Any, Any]] = {}
        for group in slots.values():
            for start in range(0, len(group), forward_batch):
                part = group[start:start + forward_batch]
                crops = torch.cat([xs[i][:, :, y1:y2, x1:x2] for i, _, (y1, y2, x1, x2) in part])
                numbers.pending = [n for _, n, _ in part]
                try:
                    dense = encode_dense(self.model, crops)
                finally:
                    numbers.pending = None
                matching = handle.last_matching
                per_source = handle.state.record.get("matching_per_source")
                for r, (i, n, _) in enumerate(part):
                    rows[(i, n)] = (
                        dense.features[r], dense.image_embeds[r], matching[r] if matching else None,
                        tuple(src[r] for src in per_source) if per_source is not None else None,
                    )

        results = []
        for i, (x, p) in enumerate(zip(xs, prepared)):
            handle.begin_image(None if whole else x, text, vocabulary=vocab, embed_text=self._embed_names,
                               prior=priors[i])
            h, w = x.shape[-2:]
            acc = None if whole else SlidingWindowAccumulator(len(vocab.queries), h, w, device=x.device,
                                                              dtype=torch.float32)
            windows, matchings, per_sources = [], [], []
            number = 0
            for batch in plans[i]:
                got = [rows.pop((i, number + k)) for k in range(len(batch))]
                number += len(batch)
                logits = handle.text_logits(
                    torch.stack([g[0] for g in got]), text, image_embeds=torch.stack([g[1] for g in got]),
                    vocabulary=vocab, whole_image=whole, windows=batch, record_windows=False,
                )
                windows.extend(batch)
                matchings.extend(g[2] for g in got if g[2] is not None)
                per_sources.extend(list(g[3]) for g in got if g[3] is not None)
                if acc is not None:
                    acc.add_batch(batch, logits)
                else:
                    # two_step_via: grid → resized input here, input → original in _finish (two bilinear steps)
                    image_logits = upsample_logits(logits[0], (h, w))
            if acc is not None:
                image_logits = acc.result()
            ictx = handle.end_image()
            record = {**handle.image_record, "windows": windows, "matching": matchings}
            if per_sources:
                record["matching_per_source"] = per_sources
            record.update(ictx.record)
            results.append(self._finish(image_logits, x, p.original, vocab, ictx.prob_thd, record, maps))
        return results

    def _numbering(self) -> _WindowNumbers:
        if self._window_numbers is None:
            self._window_numbers = _WindowNumbers()
            self.handle.pm.register(self._window_numbers, name="segmenter-window-numbers")
        return self._window_numbers

    def _image_priors(self, xs: Sequence[Tensor], text: Tensor) -> list[Tensor]:
        """``(1, Q)`` presence prior of each whole image (cass.md §3): one unpatched forward per image size."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, x in enumerate(xs):
            by_size.setdefault(tuple(x.shape[-2:]), []).append(i)
        priors: list[Tensor | None] = [None] * len(xs)
        for members in by_size.values():
            embeds = image_embedding(self.model, torch.cat([xs[i] for i in members])).float()
            prior = cosine_prior(embeds, text.to(embeds.device))
            if not torch.isfinite(prior).all():
                raise FloatingPointError(
                    non_finite_message("the CLIP image embedding of the presence prior", self.model, None))
            for r, i in enumerate(members):
                priors[i] = prior[r:r + 1]
        return priors  # type: ignore[return-value]

    def _embed_names(self, names: Sequence[str]) -> Tensor:
        """``(n, d)`` embeddings of extra prompts (one query each, duplicates kept), as the vocabulary's."""
        return self.text_embeddings(Vocabulary(tuple((n,) for n in names), allow_duplicates=True))


def _parse_vocabulary(vocabulary: Any) -> Vocabulary:
    if isinstance(vocabulary, str) and not vocabulary.strip(" \t\r\n;,"):
        raise ValueError(f"empty vocabulary {vocabulary!r}: give at least one class, e.g. 'cat; dog, puppy; sky'")
    return Vocabulary.parse(vocabulary)
