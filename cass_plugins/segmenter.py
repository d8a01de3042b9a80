"""``Segmenter``: one image + a vocabulary → label map, per-class probabilities and raw logits.

Flow (cass.md §5, protocol.md §6-8): load → resize short side → CLIP-normalise → whole-image prior (once) →
windows (batched) → patched CLIP ∥ VFM → dense features → OTA text → cosine logits → OPS → accumulate → original
size → PAMR (optional) → logit scale, softmax, synonyms max, background threshold.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .image import ImageSource, clip_normalize, load_image, resize_short_side
from .ota import TextEmbeddingAdjuster
from .pamr import apply_pamr
from .patch import PatchHandle, encode_dense, image_embedding, patch_clip
from .plugins import ImageContext, LogitsContext, TextContext, hookimpl
from .postprocess import logits_to_labels, upsample_logits
from .presets import Config
from .prior import PresencePriorHead
from .text import default_tokenizer, encode_text
from .vocabulary import Vocabulary
from .windows import SlidingWindowAccumulator, iter_window_batches, window_grid

__all__ = ["Segmenter", "SegmentationResult", "PresencePriorPlugin", "TextAdjusterPlugin"]


@dataclass
class SegmentationResult:
    """Output of :meth:`Segmenter.segment`, all at the original image size.

    Attributes:
        labels: ``(H, W)`` int64 class indices into ``vocabulary.class_names``.
        probs: ``(C, H, W)`` per-class probabilities (max over synonyms, not renormalised).
        logits: ``(Q, H, W)`` raw cosine logits per query (after the prior and PAMR, before the logit scale).
        vocabulary: the vocabulary used.
        record: per-image inspection data: ``"windows"`` the ``(y1, y2, x1, x2)`` box of every window (one
            whole-image box in whole mode); ``"matching"`` one :class:`~cass_plugins.matching.HeadMatching` per
            window in the same order (assignment, weights, margin, cost; empty without spectral distillation;
            for baselines with two graphs the first graph's, all of them under ``"matching_per_source"``);
            ``"ota_clusters"`` the OTA clusters as tuples of query names; and what components added through
            ``ImageContext.record``.
    """

    labels: Tensor
    probs: Tensor
    logits: Tensor
    vocabulary: Vocabulary
    record: dict[str, Any] = field(default_factory=dict)

    def class_areas(self) -> dict[str, float]:
        """Fraction of the image assigned to each class (classes with zero area included)."""
        counts = torch.bincount(self.labels.flatten().cpu(), minlength=self.vocabulary.num_classes)
        total = float(self.labels.numel())
        return {name: counts[i].item() / total for i, name in enumerate(self.vocabulary.class_names)}


class PresencePriorPlugin:
    """OPS as a plugin: blends the per-window logits with the presence prior (cass.md §3)."""

    def __init__(self, gamma: float) -> None:
        self.head = PresencePriorHead(gamma)

    @hookimpl
    def cass_refine_logits(self, ctx: LogitsContext) -> None:
        if ctx.prior is not None:
            ctx.logits = self.head(ctx.logits, ctx.prior)


class TextAdjusterPlugin:
    """OTA as a plugin: per-window text adjustment toward the top patches (cass.md §4)."""

    def __init__(self, alpha: float, h_threshold: float, top_n: int = 2) -> None:
        self.adjuster = TextEmbeddingAdjuster(alpha, h_threshold, top_n)

    @hookimpl
    def cass_adjust_text(self, ctx: TextContext) -> None:
        if ctx.prior is None:
            return
        base = ctx.text[0] if ctx.text.dim() == 3 else ctx.text
        clusters = self.adjuster.cluster(base, key=ctx.vocabulary.queries if ctx.vocabulary is not None else None)
        ctx.text = self.adjuster.adjust(ctx.features, base, ctx.prior, clusters)
        ctx.record["ota_clusters"] = clusters


class Segmenter:
    """Training-free open-vocabulary segmentation of single images with a patched CLIP.

    Args:
        clip_model: an open_clip / OpenAI-clip-style CLIP model (image and text towers).
        vfm: the VFM for spectral distillation (timm ViT, e.g. DINO B/8); ``None`` switches it off.
        vocabulary: default classes (any form :meth:`Vocabulary.parse` accepts).
        preset, dataset, baseline, components, plugins, **overrides: as :func:`~cass_plugins.patch_clip`.
        tokenizer: text tokenizer; default: open_clip's CLIP BPE tokenizer.
        device: move the models there (default: where the CLIP model is).
        text_cache: keep text embeddings in the on-disk cache (:mod:`cass_plugins.cache`); ``False``: no caching.
        progress: progress bar while encoding text (``None``: only on a terminal and for runs over a second).

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
        cfg = self.config
        try:
            if cfg.presence_prior:
                self.handle.pm.register(PresencePriorPlugin(cfg.gamma), name="presence_prior")
            if cfg.ota:
                self.handle.pm.register(TextAdjusterPlugin(cfg.alpha, cfg.h_threshold, cfg.top_n), name="ota")
            self.tokenizer = tokenizer if tokenizer is not None else default_tokenizer(None)
        except BaseException:
            self.handle.remove()  # leave the model as we found it
            raise
        self.device = next(clip_model.parameters()).device
        self.vocabulary = default_vocabulary
        self.text_cache, self.progress = text_cache, progress

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
        resized = resize_short_side(rgb, self.config.short_side, self.config.max_long_side)
        return clip_normalize(resized)[None].to(self.device), original

    @torch.no_grad()
    def segment(self, image: ImageSource, vocabulary: Any = None) -> SegmentationResult:
        """Segment one image (path, PIL image, numpy array or tensor) with ``vocabulary`` (or the default one)."""
        if not self.handle.active:
            raise RuntimeError("this Segmenter was closed (its model is unpatched); create a new one")
        vocab = _parse_vocabulary(vocabulary) if vocabulary is not None else self.vocabulary
        if vocab is None:
            raise ValueError("no vocabulary: pass vocabulary=['cat', 'dog', ...] here or to Segmenter(...)")
        cfg = self.config
        x, original = self.preprocess(image)
        text = self.text_embeddings(vocab)
        ictx = ImageContext(vocabulary=vocab, text=text, embed_text=self._embed_names, prob_thd=cfg.prob_thd)
        self.handle.reset_windows()  # per-window matchings see this image's window numbers
        self._window_record: dict[str, list[Any]] = {"windows": [], "matching": [], "matching_per_source": []}
        self._clusters: Tensor | None = None
        self.handle.pm.hook.cass_begin_image(ctx=ictx)
        needs_prior = cfg.presence_prior or cfg.ota
        prior = None
        if needs_prior and cfg.prior_source == "image" and cfg.mode == "slide":
            prior = _cosine(image_embedding(self.model, x), text)  # once per image (cass.md §3)
            if not torch.isfinite(prior).all():
                raise FloatingPointError(_non_finite_message("the whole-image CLIP embedding", self.model, None))

        if cfg.mode == "whole":
            logits = self._run_windows(x, text, vocab, prior, needs_prior, [(0, x.shape[-2], 0, x.shape[-1])])
            logits = upsample_logits(logits[0], original, two_step_via=tuple(x.shape[-2:]))
        else:
            h, w = x.shape[-2:]
            acc = SlidingWindowAccumulator(len(vocab.queries), h, w, device=x.device, dtype=torch.float32)
            windows = window_grid(h, w, cfg.crop, cfg.stride)
            for batch in iter_window_batches(windows, cfg.window_batch):
                crops = torch.cat([x[:, :, y1:y2, x1:x2] for (y1, y2, x1, x2) in batch])
                batch_logits = self._run_windows(crops, text, vocab, prior, needs_prior, batch)
                acc.add_batch(batch, batch_logits)
            logits = upsample_logits(acc.result(), original)

        self.handle.pm.hook.cass_end_image(ctx=ictx)  # e.g. CDAM's per-image entropy threshold
        if cfg.pamr_steps > 0:
            guide = F.interpolate(x.float(), size=original, mode="bilinear", align_corners=False)
            logits = apply_pamr(guide, logits[None], cfg.pamr_steps, cfg.pamr_dilations)[0]
        labels, probs = logits_to_labels(
            logits, vocab.query_to_class_tensor(logits.device), logit_scale=cfg.logit_scale, prob_thd=ictx.prob_thd,
            area_thd=cfg.area_thd,
        )
        record = {**self._image_record(vocab), **ictx.record}
        return SegmentationResult(labels.cpu(), probs.cpu(), logits.cpu(), vocab, record)

    def _embed_names(self, names: Sequence[str]) -> Tensor:
        """``(n, d)`` embeddings of extra prompts (one query each, duplicates kept), as the vocabulary's."""
        return self.text_embeddings(Vocabulary(tuple((n,) for n in names), allow_duplicates=True))

    def _run_windows(
        self, crops: Tensor, text: Tensor, vocab: Vocabulary, prior: Tensor | None, needs_prior: bool,
        windows: list[tuple[int, int, int, int]] | None,
    ) -> Tensor:
        """Dense features of a batch of crops → per-query logits ``(b, Q, gh, gw)``."""
        try:
            dense = encode_dense(self.model, crops)
        except (torch.linalg.LinAlgError, ValueError, RuntimeError) as err:
            # NaN/inf keys first surface in the spectral solvers (SVD, matching); name the cause instead
            if isinstance(err, torch.linalg.LinAlgError) or _non_finite_parameters(self.model, self.vfm):
                raise FloatingPointError(_non_finite_message("the attention keys", self.model, self.vfm)) from err
            raise
        features = dense.features.float()
        if not torch.isfinite(features).all():
            raise FloatingPointError(_non_finite_message("the CLIP patch features", self.model, self.vfm))
        b = features.shape[0]
        if needs_prior and (prior is None or self.config.prior_source == "crop"):
            # whole-image mode: this pass is the whole image; crop mode: each window's own embedding
            window_prior = _cosine(dense.image_embeds.float(), text)
        else:
            window_prior = prior.expand(b, -1) if prior is not None else None
        tctx = TextContext(features=features, text=text[None].expand(b, -1, -1), prior=window_prior, vocabulary=vocab)
        self.handle.pm.hook.cass_adjust_text(ctx=tctx)
        logits = TextEmbeddingAdjuster.logits(features, tctx.text)  # (b, Q, gh, gw)
        lctx = LogitsContext(
            logits=logits, features=features, text=tctx.text, prior=window_prior,
            windows=windows if self.config.mode == "slide" else None,
        )
        self.handle.pm.hook.cass_refine_logits(ctx=lctx)
        self._record_windows(windows, tctx.record)
        return lctx.logits

    def _record_windows(self, windows: list[tuple[int, int, int, int]], text_record: dict[str, Any]) -> None:
        """Keep every window's head matching (the handle only holds the last forward's)."""
        rec = self._window_record
        rec["windows"].extend(windows)
        rec["matching"].extend(self.handle.last_matching)
        per_source = self.handle.state.record.get("matching_per_source")
        if per_source is not None:  # one list per graph source, each with one matching per batch row
            rec["matching_per_source"].extend(zip(*per_source))
        if "ota_clusters" in text_record:
            self._clusters = text_record["ota_clusters"]

    def _image_record(self, vocab: Vocabulary) -> dict[str, Any]:
        rec = self._window_record
        record: dict[str, Any] = {"windows": rec["windows"], "matching": rec["matching"]}
        if rec["matching_per_source"]:
            record["matching_per_source"] = [list(m) for m in rec["matching_per_source"]]
        if self._clusters is not None:
            labels = self._clusters.tolist()
            groups: dict[int, list[str]] = {}
            for query, label in zip(vocab.queries, labels):
                groups.setdefault(label, []).append(query)
            record["ota_clusters"] = [tuple(groups[k]) for k in sorted(groups)]
        return record


def _parse_vocabulary(vocabulary: Any) -> Vocabulary:
    if isinstance(vocabulary, str) and not vocabulary.strip(" \t\r\n;,"):
        raise ValueError(f"empty vocabulary {vocabulary!r}: give at least one class, e.g. 'cat; dog, puppy; sky'")
    return Vocabulary.parse(vocabulary)


def _non_finite_parameters(clip_model: nn.Module, vfm: nn.Module | None) -> list[str]:
    """``"CLIP parameters [names]"`` / ``"VFM parameters [names]"`` for each model holding NaN/inf weights."""
    culprits = []
    for label, model in (("CLIP", clip_model), ("VFM", vfm)):
        if model is None:
            continue
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            culprits.append(f"{label} parameters {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    return culprits


def _non_finite_message(where: str, clip_model: nn.Module, vfm: nn.Module | None) -> str:
    """Name the model(s) whose parameters hold NaN/inf, or say that the activations overflowed."""
    culprits = _non_finite_parameters(clip_model, vfm)
    cause = (
        "NaN/inf in the " + " and ".join(culprits) + ": the checkpoint is corrupt or was loaded incompletely"
        if culprits else "no parameter is NaN/inf, so the activations overflowed: run the models in float32"
    )
    return f"NaN or inf in {where} ({cause})"


def _cosine(image_embeds: Tensor, text: Tensor) -> Tensor:
    return PresencePriorHead.prior(image_embeds.float(), text.to(image_embeds.device))
