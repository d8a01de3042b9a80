"""``Segmenter``: one image + a vocabulary → label map, per-class probabilities and raw logits.

Flow (docs/spec/cass.md §5, docs/spec/protocol.md §6-8): load → resize short side → CLIP-normalise → whole-image
prior (once, :meth:`PatchHandle.begin_image`) → windows (batched) → :meth:`PatchHandle.logits` (patched CLIP ∥ VFM →
dense features → text components → cosine logits → logit components) → accumulate → original size → PAMR
(optional) → logit scale, softmax, synonyms max, background threshold.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cass_plugins.core.config import Config
from cass_plugins.core.patch import PatchHandle, patch_clip
from cass_plugins.pipeline.image import ImageSource, clip_normalize, load_image, resize_short_side
from cass_plugins.pipeline.pamr import apply_pamr
from cass_plugins.pipeline.result import SegmentationResult
from cass_plugins.pipeline.postprocess import labels_at_size, logits_to_labels, upsample_banded, upsample_logits
from cass_plugins.pipeline.text import default_tokenizer, encode_text
from cass_plugins.pipeline.vocabulary import Vocabulary
from cass_plugins.pipeline.windows import SlidingWindowAccumulator, iter_window_batches, window_grid

__all__ = ["Segmenter", "SegmentationResult"]


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
        **overrides: Any,
    ) -> None:
        # Parse the vocabulary first: a bad one must not leave the model patched.
        default_vocabulary = _parse_vocabulary(vocabulary) if vocabulary is not None else None
        if device is not None:
            clip_model = clip_model.to(device)
            vfm = vfm.to(device) if vfm is not None else None
        self.model = clip_model.eval()
        self.vfm = vfm.eval() if vfm is not None else None
        self.handle: PatchHandle = patch_clip(
            clip_model, vfm, preset, dataset=dataset, baseline=baseline, components=components, plugins=plugins,
            **overrides,
        )
        self.config: Config = self.handle.config
        try:
            self.tokenizer = tokenizer if tokenizer is not None else default_tokenizer(None)
        except BaseException:
            self.handle.remove()  # leave the model as we found it
            raise
        self.device = next(clip_model.parameters()).device
        self.vocabulary = default_vocabulary
        self.text_cache, self.progress = text_cache, progress
        self.sam = sam

    # ------------------------------------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Unpatch the model."""
        self.handle.remove()

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
    def preprocess(self, image: ImageSource) -> tuple[Tensor, tuple[int, int]]:
        """Load, resize (short side) and CLIP-normalise → ``(1, 3, H, W)`` float32 and the original size."""
        rgb = load_image(image)
        original = (rgb.shape[-2], rgb.shape[-1])
        # uint8 in → uint8 out (rounded like the reference's cv2.resize), then normalised (protocol.md §6)
        resized = resize_short_side(rgb, self.config.pipeline.short_side, self.config.pipeline.max_long_side)
        return clip_normalize(resized)[None].to(self.device), original

    @torch.no_grad()
    def segment(self, image: ImageSource, vocabulary: Any = None, *, maps: bool = True) -> SegmentationResult:
        """Segment one image (path, PIL image, numpy array or tensor) with ``vocabulary`` (or the default one).

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
        if not self.handle.active:
            raise RuntimeError("this Segmenter was closed (its model is unpatched); create a new one")
        vocab = _parse_vocabulary(vocabulary) if vocabulary is not None else self.vocabulary
        if vocab is None:
            raise ValueError("no vocabulary: pass vocabulary=['cat', 'dog', ...] here or to Segmenter(...)")
        cfg = self.config.pipeline
        handle = self.handle
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
        q2c = vocab.query_to_class_tensor(logits.device)
        decision = dict(logit_scale=cfg.logit_scale, prob_thd=ictx.prob_thd, area_thd=cfg.area_thd)
        if not maps and cfg.pamr_steps == 0:
            labels = labels_at_size(logits, original, q2c, **decision)
            return SegmentationResult(labels.cpu(), None, logits.cpu(), vocab, record)
        # the same bands of rows as labels_at_size: the same bits, so both give the same labels
        full = upsample_banded(logits, original)
        if cfg.pamr_steps > 0:
            guide = F.interpolate(x.float(), size=original, mode="bilinear", align_corners=False)
            full = apply_pamr(guide, full[None], cfg.pamr_steps, cfg.pamr_dilations)[0]
        labels, probs = logits_to_labels(full, q2c, **decision)
        if not maps:
            return SegmentationResult(labels.cpu(), None, logits.cpu(), vocab, record)
        return SegmentationResult(labels.cpu(), probs.cpu(), full.cpu(), vocab, record)

    def _embed_names(self, names: Sequence[str]) -> Tensor:
        """``(n, d)`` embeddings of extra prompts (one query each, duplicates kept), as the vocabulary's."""
        return self.text_embeddings(Vocabulary(tuple((n,) for n in names), allow_duplicates=True))


def _parse_vocabulary(vocabulary: Any) -> Vocabulary:
    if isinstance(vocabulary, str) and not vocabulary.strip(" \t\r\n;,"):
        raise ValueError(f"empty vocabulary {vocabulary!r}: give at least one class, e.g. 'cat; dog, puppy; sky'")
    return Vocabulary.parse(vocabulary)
