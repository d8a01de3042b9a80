"""``segment_video``: segment a video (a file or any iterable of frames) frame by frame with temporal consistency.

Frames are streamed (decoded, segmented and handed out one at a time); the vocabulary's text embeddings are computed
once for the whole video; frames go through ``Segmenter.segment_many`` (the batched multi-image path) when the
Segmenter has it, ``Segmenter.segment`` otherwise. Temporal consistency (:mod:`cass_plugins.video.temporal`,
docs/video.md) is switchable with ``temporal=``.
"""
from __future__ import annotations

import inspect
import os
from collections import deque
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from cass_plugins.core.hookspecs import ImageContext, hookimpl
from cass_plugins.pipeline.image import load_image
from cass_plugins.pipeline.postprocess import labels_at_size, logits_to_labels
from cass_plugins.pipeline.result import SegmentationResult
from cass_plugins.pipeline.vocabulary import Vocabulary

from .io import DecodedFrame, check_sampling, iter_video_frames, probe_video, require_av
from .temporal import LogitSmoother, StableMatching, TemporalConfig, resolve_temporal

__all__ = ["VideoFrameResult", "segment_video", "stable_matching_applies"]


@dataclass
class VideoFrameResult:
    """One segmented frame.

    Attributes:
        index: the frame's index in the source (0-based, before ``every`` subsampling).
        time: its time in seconds (``None`` for frames given as an iterable).
        image: ``(H, W, 3)`` uint8 RGB frame as segmented.
        result: the :class:`SegmentationResult`; with smoothing on, ``labels`` (and ``logits``, ``probs``) are the
            smoothed ones. ``result.record["temporal"]`` says what the components did on this frame.
    """

    index: int
    time: float | None
    image: np.ndarray
    result: SegmentationResult
    temporal: dict[str, Any] = field(default_factory=dict)


def stable_matching_applies(segmenter: Any) -> tuple[bool, str]:
    """Whether :class:`StableMatching` can act on this Segmenter, and why not: spectral distillation must be on with
    an optimising matching (``complementary`` or ``similar``; fixed assignments and ``sequential`` never flip)."""
    plugin = segmenter.handle.spectral
    if plugin is None:
        return False, "spectral distillation is off (no head matching to stabilise)"
    matching = plugin.config.matching
    if not (isinstance(matching, str) and matching in ("complementary", "similar")):
        return False, f"spectral.matching={matching!r} is not an optimised matching (it cannot flip between frames)"
    return True, ""


class _FrameHooks:
    """Plain plugin added to the Segmenter's plugin manager for one video: records the background threshold each
    frame's post-processing used (components such as CDAM set it per image), which the smoothed labels need. One
    ``cass_end_image`` per image, in order, on both the single-image and the batched path."""

    def __init__(self) -> None:
        self.thresholds: deque[float] = deque()

    @hookimpl(wrapper=True)
    def cass_end_image(self, ctx: ImageContext) -> Any:
        out = yield  # every other implementation has run: the threshold is final
        self.thresholds.append(float(ctx.prob_thd))
        return out


@contextmanager
def _installed(segmenter: Any, stable: StableMatching | None, hooks: _FrameHooks) -> Iterator[None]:
    """Install the video's helpers on the Segmenter and restore it exactly afterwards: the stable matching as the
    spectral plugin's ``matching``, the frame hooks, and text embeddings computed once."""
    with ExitStack() as stack:
        if stable is not None:
            plugin = segmenter.handle.spectral
            original = plugin.config
            plugin.config = original.replace(matching=stable)
            stack.callback(setattr, plugin, "config", original)
        segmenter.handle.pm.register(hooks)
        stack.callback(segmenter.handle.pm.unregister, hooks)
        own = "text_embeddings" in vars(segmenter)
        previous = segmenter.text_embeddings
        cache: dict[tuple, torch.Tensor] = {}

        def text_once(vocabulary: Vocabulary) -> torch.Tensor:
            key = vocabulary.classes
            if key not in cache:
                cache[key] = previous(vocabulary)
            return cache[key].clone()  # components must not see another frame's edits

        segmenter.text_embeddings = text_once
        stack.callback(lambda: setattr(segmenter, "text_embeddings", previous) if own
                       else vars(segmenter).pop("text_embeddings", None))
        yield


def _frames(source: Any, every: int, max_frames: int | None) -> Iterator[DecodedFrame]:
    if isinstance(source, (str, os.PathLike)):
        yield from iter_video_frames(source, every=every, max_frames=max_frames)
        return
    kept = 0
    for index, frame in enumerate(source):
        if max_frames is not None and kept >= max_frames:
            break
        if index % every:
            continue
        kept += 1
        rgb = load_image(frame).permute(1, 2, 0).numpy()  # the Segmenter's own conversion rules
        yield DecodedFrame(index=index, time=None, image=np.ascontiguousarray(rgb))


def segment_video(
    segmenter: Any,
    frames_or_path: str | os.PathLike[str] | Iterable[Any],
    vocabulary: Any = None,
    *,
    every: int = 1,
    max_frames: int | None = None,
    temporal: bool | str | TemporalConfig | None = True,
    batch_size: int = 4,
    maps: bool = False,
) -> Iterator[VideoFrameResult]:
    """Segment a video frame by frame; yields a :class:`VideoFrameResult` per kept frame, in order.

    Everything is checked when called (before any frame is decoded); the frames are decoded and segmented as the
    iterator is consumed, so memory stays bounded whatever the video's length. The Segmenter is modified while the
    iterator runs (the stable matching, a hook plugin, text embeddings memoised) and restored when it is exhausted or
    closed (``with contextlib.closing(segment_video(...)) as frames:`` when stopping early).

    Args:
        segmenter: a :class:`~cass_plugins.pipeline.segmenter.Segmenter`.
        frames_or_path: a video file (decoded with PyAV, the ``[video]`` extra) or an iterable of frames (anything
            ``Segmenter.segment`` takes: arrays, tensors, PIL images, paths).
        vocabulary: the classes (default: the Segmenter's).
        every: keep every ``every``-th frame (1: all).
        max_frames: stop after this many kept frames (``None``: all).
        temporal: ``True``/``"on"`` (stable head assignment where it applies + logit smoothing), ``False``/``"off"``,
            ``"matching"``, ``"smoothing"``, or a :class:`TemporalConfig` (docs/video.md).
        batch_size: frames per ``segment_many`` call, when the Segmenter has it.
        maps: give every frame's ``probs`` and full-size ``logits`` (``segment(maps=True)``).

    Raises:
        ValueError: bad ``every`` / ``max_frames`` / ``temporal`` / ``batch_size``, no vocabulary, a stable matching
            requested where it cannot act; :class:`~cass_plugins.video.io.VideoError` for an unreadable video;
            ImportError naming ``pip install "cass_plugins[video]"`` for a file without PyAV.
    """
    check_sampling(every, max_frames)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    config = resolve_temporal(temporal)
    vocab = Vocabulary.parse(vocabulary) if vocabulary is not None else segmenter.vocabulary
    if vocab is None:
        raise ValueError("no vocabulary: pass vocabulary='cat; dog; sky' here or to Segmenter(...)")
    if not segmenter.handle.active:
        raise RuntimeError("this Segmenter was closed (its model is unpatched); create a new one")
    if isinstance(frames_or_path, (str, os.PathLike)):
        require_av()
        probe_video(Path(frames_or_path))  # an unreadable file fails now, not at the first frame
    applies, why = stable_matching_applies(segmenter)
    if config.stable_matching and not applies:
        raise ValueError(f"temporal stable matching cannot act here: {why}; switch it off "
                         "(temporal='smoothing' or TemporalConfig(stable_matching=False))")
    stable = None
    if applies and config.stable_matching is not False:
        spec = segmenter.handle.spectral.config
        stable = StableMatching(
            spec.matching, tie_margin=config.tie_margin,
            solve_dtype=torch.float32 if spec.solve_dtype == "float32" else torch.float64,
            tie_break=spec.tie_break, pairing=spec.pairing,
        )
    smoother = (LogitSmoother(config.smoothing, config.motion_threshold, config.scene_cut)
                if config.smoothing_on else None)
    # PAMR runs on the full-size logits: smoothing before it would need it re-run, so smooth the full maps instead
    full_maps = maps or (smoother is not None and segmenter.config.pipeline.pamr_steps > 0)
    return _run(segmenter, frames_or_path, vocab, every, max_frames, config, stable, smoother, batch_size, full_maps,
                maps)


def _segment_stream(segmenter: Any, tensors: Iterator[torch.Tensor], vocab: Vocabulary, batch_size: int,
                    full_maps: bool) -> Iterator[SegmentationResult]:
    many = getattr(segmenter, "segment_many", None)
    if many is None:
        for t in tensors:
            yield segmenter.segment(t, vocab, maps=full_maps)
        return
    params = inspect.signature(many).parameters
    kwargs: dict[str, Any] = {"batch_size": batch_size} if "batch_size" in params else {}
    if "maps" in params:
        kwargs["maps"] = full_maps
    yield from many(tensors, vocab, **kwargs)


def _run(
    segmenter: Any, source: Any, vocab: Vocabulary, every: int, max_frames: int | None, config: TemporalConfig,
    stable: StableMatching | None, smoother: LogitSmoother | None, batch_size: int, full_maps: bool, maps: bool,
) -> Iterator[VideoFrameResult]:
    hooks = _FrameHooks()
    pending: deque[DecodedFrame] = deque()

    def feed() -> Iterator[torch.Tensor]:
        for frame in _frames(source, every, max_frames):
            pending.append(frame)  # paired with its result in order; at most a batch or two in flight
            yield torch.from_numpy(frame.image).permute(2, 0, 1)

    pipe = segmenter.config.pipeline
    q2c = vocab.query_to_class_tensor(torch.device("cpu"))
    first = True
    previous_matching: list[list[int]] | None = None
    with _installed(segmenter, stable, hooks):
        for result in _segment_stream(segmenter, feed(), vocab, batch_size, full_maps):
            frame = pending.popleft()
            prob_thd = hooks.thresholds.popleft() if hooks.thresholds else pipe.prob_thd
            info: dict[str, Any] = {
                "stable_matching": stable is not None, "smoothing": config.smoothing if smoother else 0.0,
            }
            matching = [m.assignment.tolist() for m in result.record.get("matching", [])]
            if previous_matching is not None and len(matching) == len(previous_matching):
                # windows whose fused heads differ from the previous frame's (0 = the same features' recipe)
                info["matching_changed"] = sum(a != b for a, b in zip(matching, previous_matching))
            previous_matching = matching
            if smoother is not None:
                frame_t = torch.from_numpy(frame.image).permute(2, 0, 1)
                smoothed, reset = smoother.update(result.logits, frame_t)
                info["reset_fraction"] = reset
                labels, probs = _decide(smoothed, result, q2c, pipe, prob_thd)
                if first and not torch.equal(labels, result.labels):
                    raise RuntimeError(
                        "logit smoothing recomputes the labels from the logits, but this Segmenter's labels are not "
                        "the plain decision of its logits (a component refines the labels afterwards); use "
                        "temporal='matching' or 'off'"
                    )
                result = SegmentationResult(labels, probs if maps else None, smoothed, result.vocabulary, result.record)
            elif not maps and result.probs is not None:
                result = replace(result, probs=None)
            first = False
            result.record["temporal"] = info
            yield VideoFrameResult(frame.index, frame.time, frame.image, result, info)


def _decide(logits: torch.Tensor, result: SegmentationResult, q2c: torch.Tensor, pipe: Any,
            prob_thd: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Segmenter's decision (logit scale, softmax, synonyms max, threshold, area rule) on smoothed logits: at the
    original size from low-resolution logits (``maps=False`` results) or directly on full-size ones."""
    decision = dict(logit_scale=pipe.logit_scale, prob_thd=prob_thd, area_thd=pipe.area_thd)
    q2c = q2c.to(logits.device)
    if result.probs is None:
        return labels_at_size(logits, tuple(result.labels.shape), q2c, **decision).cpu(), None
    labels, probs = logits_to_labels(logits, q2c, **decision)
    return labels.cpu(), probs.cpu()
