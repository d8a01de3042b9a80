"""Temporal consistency for video segmentation: a stable CASS head assignment and motion-guarded logit smoothing.

Both are switchable parts of :func:`~cass_plugins.video.segment.segment_video` (``temporal=``; docs/video.md).

**Stable head assignment.** CASS pairs VFM and CLIP heads by the Hungarian algorithm on the spectral cost (CASS §3.2;
docs/spec/cass.md §2 step 7). That cost is close to additive, so optima are often tied or nearly so (cass.md §10):
which one the solver returns follows rounding, and between two nearly identical frames it can flip, moving the patch
features by several percent (and batching several frames in one forward changes the rounding, so it changes the
pick too). :class:`StableMatching` is a ``spectral.matching`` callable ``fn(cost, window)`` (docs/matching.md) that
keeps the previous frame's assignment of the same window while its total cost on the current frame is within
``tie_margin`` of the optimum, and takes the new optimum otherwise.

**Logit smoothing.** :class:`LogitSmoother` keeps an exponential moving average of the per-query cosine logits,
``s_t = (1 − β)·l_t + β·s_{t−1}``, and resets it (``s_t = l_t``) where the frame changed: per logit cell where the
mean absolute RGB difference to the previous frame (0–1 scale, averaged over the cell) exceeds ``motion_threshold``,
and everywhere when the whole frame's mean difference exceeds ``scene_cut``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cass_plugins.cass.matching import PAIRINGS, TIE_BREAKS, match_heads

__all__ = ["TemporalConfig", "StableMatching", "LogitSmoother", "resolve_temporal", "TEMPORAL_MODES"]

#: ``temporal=`` names: both components, none, or one of them.
TEMPORAL_MODES = ("on", "off", "matching", "smoothing")


@dataclass(frozen=True)
class TemporalConfig:
    """Temporal-consistency settings of :func:`~cass_plugins.video.segment.segment_video`.

    Attributes:
        stable_matching: keep the previous frame's head assignment within ``tie_margin`` (:class:`StableMatching`).
            ``None`` (default): on exactly when spectral distillation runs with an optimising matching
            (``complementary`` / ``similar``); ``True`` refuses a Segmenter where it cannot act.
        tie_margin: how much larger (total cost, the solver's objective) the previous assignment may be than the
            current optimum and still be kept. The default, 1e-4, is two orders above float32 rounding of the cost
            (≈4e-6, cass.md §10) and far below the difference between distinct spectra.
        smoothing: β of the moving average, in [0, 1); 0 switches the smoothing off.
        motion_threshold: mean absolute RGB difference (0–1) of a logit cell above which it is reset, in (0, 1].
        scene_cut: mean absolute RGB difference of the whole frame above which every cell is reset, in (0, 1].
    """

    stable_matching: bool | None = None
    tie_margin: float = 1e-4
    smoothing: float = 0.5
    motion_threshold: float = 0.08
    scene_cut: float = 0.25

    def __post_init__(self) -> None:
        if self.stable_matching not in (None, True, False):
            raise ValueError(f"stable_matching must be None (auto), True or False, got {self.stable_matching!r}")
        if not (math.isfinite(self.tie_margin) and self.tie_margin >= 0):
            raise ValueError(f"tie_margin must be a finite number >= 0, got {self.tie_margin!r}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing (β of the moving average) must lie in [0, 1), got {self.smoothing!r}")
        for name in ("motion_threshold", "scene_cut"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} is a mean RGB difference on a 0-1 scale: give a value in (0, 1], got {value!r}")

    @property
    def smoothing_on(self) -> bool:
        return self.smoothing > 0.0


def resolve_temporal(temporal: Any) -> TemporalConfig:
    """``True``/``"on"`` → both components (defaults); ``False``/``None``/``"off"`` → none; ``"matching"`` /
    ``"smoothing"`` → that one alone; a :class:`TemporalConfig` as is."""
    if isinstance(temporal, TemporalConfig):
        return temporal
    if temporal is True or temporal == "on":
        return TemporalConfig()
    if temporal is False or temporal is None or temporal == "off":
        return TemporalConfig(stable_matching=False, smoothing=0.0)
    if temporal == "matching":
        return TemporalConfig(stable_matching=True, smoothing=0.0)
    if temporal == "smoothing":
        return TemporalConfig(stable_matching=False)
    raise ValueError(f"temporal={temporal!r}: use one of {TEMPORAL_MODES}, True/False or a TemporalConfig")


@dataclass
class _Slot:
    assignment: list[int]
    pairs: np.ndarray


@dataclass
class StableMatching:
    """A ``spectral.matching`` callable that keeps each window's head assignment across frames within a tie margin.

    The previous assignment of a call is the last one this object returned for the same window index: frames of a
    video share their size and so their windows, and the Segmenter numbers windows per image (``segment`` and the
    batched ``segment_many`` alike), so the last call for window ``w`` was the previous frame's window ``w``. For
    each call the optimum is solved as ``spectral`` would (:func:`match_heads` with the same strategy, dtype,
    tie-break and pairing); the previous assignment is returned instead when
    ``total(previous pairs) − total(optimal pairs) ≤ tie_margin`` on the current cost (in the strategy's objective:
    ``C`` for complementary, ``−C`` for similar, on the cost rounded to ``solve_dtype`` as the solver sees it), so
    every returned assignment is within ``tie_margin`` of the optimum. Baselines with two graph sources (SCLIP's
    q-q and k-k graphs) call it twice per window; their calls then alternate between the sources' assignments,
    which keeps that bound but stabilises less.

    Attributes:
        reused: calls so far that kept the previous assignment although the optimum differed.
        calls: calls so far.
    """

    strategy: str = "complementary"
    tie_margin: float = 1e-4
    solve_dtype: torch.dtype = torch.float32
    tie_break: str | None = None
    pairing: str = "official"
    reused: int = 0
    calls: int = 0
    _last: dict[int, _Slot] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.strategy not in ("complementary", "similar"):
            raise ValueError(
                f"a stable matching keeps an optimum of 'complementary' or 'similar'; {self.strategy!r} has none to keep"
            )
        if self.tie_break not in TIE_BREAKS or self.pairing not in PAIRINGS:
            raise ValueError(f"tie_break must be one of {TIE_BREAKS} and pairing one of {PAIRINGS}")

    def reset(self) -> None:
        """Forget every previous assignment (a new video)."""
        self._last.clear()
        self.reused = self.calls = 0

    def _objective(self, cost: Tensor, pairs: np.ndarray) -> float:
        c = cost.detach().to(self.solve_dtype).cpu().to(torch.float64).numpy()
        obj = -c if self.strategy == "similar" else c
        return math.fsum(obj[pairs, np.arange(obj.shape[1])])

    def __call__(self, cost: Tensor, window: int) -> list[int]:
        hv, hc = cost.shape
        pairing = self.pairing if hv == hc else "paper"  # as spectral does for unequal head counts
        fresh = match_heads(cost, self.strategy, solve_dtype=self.solve_dtype, tie_break=self.tie_break,
                            pairing=pairing)
        chosen = _Slot(fresh.assignment.tolist(), fresh.pairs.cpu().numpy())
        prev = self._last.get(window)
        if prev is not None and len(prev.assignment) == hc and prev.assignment != chosen.assignment:
            excess = self._objective(cost, prev.pairs) - self._objective(cost, chosen.pairs)
            if excess <= self.tie_margin:
                chosen = prev
                self.reused += 1
        self._last[window] = chosen
        self.calls += 1
        return list(chosen.assignment)


class LogitSmoother:
    """Exponential moving average of per-query logits over frames, reset where the frame moved (module docstring).

    Args:
        smoothing: β in ``s_t = (1 − β)·l_t + β·s_{t−1}``, in [0, 1).
        motion_threshold: per-cell reset threshold on the mean absolute RGB difference (0–1).
        scene_cut: whole-frame reset threshold on the mean absolute RGB difference (0–1).
    """

    def __init__(self, smoothing: float, motion_threshold: float, scene_cut: float) -> None:
        TemporalConfig(smoothing=smoothing, motion_threshold=motion_threshold, scene_cut=scene_cut)  # validation
        self.beta, self.motion_threshold, self.scene_cut = smoothing, motion_threshold, scene_cut
        self._state: Tensor | None = None
        self._frame: Tensor | None = None

    def reset(self) -> None:
        self._state = self._frame = None

    def update(self, logits: Tensor, frame: Tensor) -> tuple[Tensor, float]:
        """Smooth one frame's logits.

        Args:
            logits: ``(Q, h, w)`` logits on any grid (the difference map is averaged onto it).
            frame: ``(3, H, W)`` uint8 RGB frame the logits belong to.

        Returns:
            the smoothed ``(Q, h, w)`` float32 logits and the fraction of cells reset (1.0 for the first frame, a
            scene cut or a change of size or vocabulary).
        """
        if logits.dim() != 3 or frame.dim() != 3 or frame.shape[0] != 3:
            raise ValueError(f"expected (Q, h, w) logits and a (3, H, W) frame, got {tuple(logits.shape)}, "
                             f"{tuple(frame.shape)}")
        logits = logits.float()
        image = frame.to(logits.device, torch.float32) / 255.0
        prev_state, prev_frame = self._state, self._frame
        self._frame = image
        if prev_state is None or prev_state.shape != logits.shape or prev_frame.shape != image.shape:
            self._state = logits.clone()
            return self._state.clone(), 1.0
        diff = (image - prev_frame).abs().mean(0)  # (H, W)
        if float(diff.mean()) > self.scene_cut:
            self._state = logits.clone()
            return self._state.clone(), 1.0
        # each logit cell's share of the frame: area average (exact block means when the sizes divide)
        cell = F.adaptive_avg_pool2d(diff[None, None], tuple(logits.shape[-2:]))[0, 0]
        moved = cell > self.motion_threshold
        blended = (1.0 - self.beta) * logits + self.beta * prev_state
        self._state = torch.where(moved[None], logits, blended)
        return self._state.clone(), float(moved.float().mean())

