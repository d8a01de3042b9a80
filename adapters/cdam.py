"""CDAM (Class Distribution-induced Attention Map, ICLR 2025) as a component on top of any last-block baseline.

The baseline's last block is pass 1: its patch output gives the initial similarity map S0 against the class and
augmented-prompt (ATP) embeddings. CDAM turns S0 into a patch-to-patch attention (JSD between class distributions,
multi-scale) and runs the last block a second time on the same input with that attention on the value path
(residual and FFN kept, as the authors do). The pass-2 patch tokens replace the baseline's. Per image, the
entropy of the window logits gives the background threshold that post-processing applies.

Section numbers (§n) refer to docs/spec/cdam.md (the authors' repository, ``CDAM/cdam_segmentor.py``, and the
paper, Kang et al. ICLR 2025); the math is in :mod:`cass_plugins.adapters.cdam_math`. The component is ``cdam``;
every part of the paper's ablation is a setting of its section (``cdam.multiscale``, ``cdam.atp``,
``cdam.entropy_threshold``), so each ablation row is a set of overrides (:data:`CDAM_ABLATION`).

Usage::

    seg = Segmenter(clip, preset="cdam-sclip", dataset="voc21", vocabulary=cdam_vocabulary("voc21"))
    # or, without the Segmenter:
    handle = patch_clip(clip, preset="sclip", components=["cdam"])
    handle.components["cdam"].set_vocabulary(clip, ["background", "cat", "dog"])
    features = encode_dense(clip, crops).features          # pass-2 features
"""
from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cass_plugins.core.hookspecs import BlockContext, ImageContext, LogitsContext, hookimpl
from cass_plugins.core.registry import ComponentSpec, Preset, Registry
from cass_plugins.core.settings import Settings, SettingError, setting
from cass_plugins.pipeline.vocabulary import Vocabulary

from . import cdam_math as cm

__all__ = [
    "CDAM", "CDAMConfig", "CDAM_ABLATION", "CDAM_PRESETS", "CDAM_DATASETS", "CDAM_BASELINES", "atp_vocabulary",
    "cdam_vocabulary", "cass_register",
]


def _scales(value: tuple[float, ...]) -> str | None:
    return None if value and all(0.0 < m <= 1.0 for m in value) else "give one or more scales in (0, 1]"


@dataclass(frozen=True)
class CDAMConfig(Settings):
    """CDAM's settings; the defaults are the authors' repository (docs/spec/cdam.md §15 lists the paper's)."""

    multiscale: bool = setting(True, doc="mean over scales; False: the full-resolution map only")
    scales: tuple[float, ...] = setting(cm.CDAM_SCALES, check=_scales, doc="scales of the multi-scale map (§7)")
    atp: bool = setting(True, doc="the 80 augmented prompts join the class distributions (§13), never the logits")
    entropy_threshold: bool = setting(True, doc="the entropy-based background threshold replaces prob_thd (§10)")
    class_temperature: float = setting(
        cm.CLASS_TEMPERATURE, range=(0.0, None), exclusive=True, doc="τ of softmax_C(S0 / τ) (§4)"
    )
    attention_temperature: float = setting(
        cm.ATTENTION_TEMPERATURE, range=(0.0, None), exclusive=True, doc="P of the row softmax of 1 − JSD (§6)"
    )
    minmax: bool = setting(True, doc="row min-max before and after the softmax (§6)")
    multiscale_order: str = setting(
        "upsample_divergence", choices=("upsample_divergence", "upsample_attention"),
        doc="repo: upsample the divergence; the paper's Eq. 3: upsample the attention (§15.3)",
    )
    row_normalize: bool = setting(False, doc="divide each CDAM row by its sum (§15.6; the repo does not)")
    pass2_arch: str = setting(
        "vanilla", choices=("vanilla", "reduced"), doc="pass 2 keeps residual + FFN (repo) or the attention only"
    )
    entropy_scale: float = setting(
        cm.ENTROPY_SCALE, range=(0.0, None), exclusive=True, doc="softmax scale before the entropy (repo 50)"
    )
    entropy_log_base: float = setting(cm.ENTROPY_LOG_BASE, range=(1.0, None), exclusive=True, doc="2: bits (repo)")
    alpha: float = setting(cm.ENTROPY_ALPHA, range=(0.0, None), doc="α of thr = default_threshold · α / H_center")
    default_threshold: float = setting(cm.DEFAULT_THRESHOLD, range=(0.0, 1.0), doc="Thr_default")
    threshold_granularity: str = setting(
        "last_window", choices=("last_window", "image"),
        doc="repo: the raster-last window's threshold; 'image': min/max entropy over all windows (the paper)",
    )
    max_chunk_elements: int = setting(1 << 24, range=(1, None), doc="memory budget of one JSD temporary")


class CDAM:
    """CDAM as a pluggy component: wraps the baseline's ``cass_block_output`` and adds a second pass.

    Built from a :class:`CDAMConfig` (the registry does ``CDAM(settings, runtime)``) or keywords of its fields:

        multiscale: average the maps of ``scales`` (§7); False: the full-resolution map only (``scales=(1.0,)``).
        scales: scales in (0, 1]; 1.0 is the full-resolution map.
        atp: the 80 augmented prompts join the class distributions (§13). They never enter the logits.
        entropy_threshold: replace the pipeline's ``prob_thd`` by the entropy-based threshold (§10); only for
            vocabularies whose class 0 is the background.
        class_temperature: τ of ``softmax_C(S0 / τ)`` (§4).
        attention_temperature: P of the row softmax (§6).
        minmax: row min-max before and after the softmax (§6, §15.4).
        multiscale_order: ``"upsample_divergence"`` (repo) or ``"upsample_attention"`` (paper Eq. 3), §15.3.
        row_normalize: divide each CDAM row by its sum (§15.6; the repo does not).
        pass2_arch: ``"vanilla"``: pass 2 keeps residual and FFN (§9, the repo); ``"reduced"``: the attention
            output only (ClearCLIP-style, not the authors').
        entropy_scale: softmax scale of the logits before the entropy (§10: 50).
        entropy_log_base: 2 (bits, repo).
        alpha: α of ``thr = default_threshold · α / H_center``.
        default_threshold: Thr_default.
        threshold_granularity: ``"last_window"`` (repo: the raster-last sliding window's threshold for the whole
            image) or ``"image"`` (min/max entropy over all windows of the image, the paper).
        max_chunk_elements: memory budget of one JSD temporary (see :func:`cass_plugins.adapters.cdam_math.pairwise_jsd`).

    The text side comes from :meth:`set_text` / :meth:`set_vocabulary`, or, inside a
    :class:`~cass_plugins.pipeline.segmenter.Segmenter`, from the ``cass_begin_image`` hook for every image.
    """

    name = "cdam"

    def __init__(self, config: CDAMConfig | None = None, runtime: Any = None, **settings: Any) -> None:
        config = CDAMConfig() if config is None else config
        if settings:  # CDAM(atp=False, ...) for use without a registry: the same settings, the same validation
            config = config.replace(**settings)
        self.config = config
        for name in CDAMConfig.field_names():
            setattr(self, name, getattr(config, name))
        self.class_embeddings: Tensor | None = None
        self.atp_embeddings: Tensor | None = None
        self._range: tuple[Tensor, Tensor] | None = None  # entropy (min, max) kept for the image so far
        self._last_key: tuple[int, ...] | None = None  # raster position of the window behind ``_range``
        self._windows_seen = 0

    def __repr__(self) -> str:
        return (
            f"CDAM(multiscale={self.multiscale}, atp={self.atp}, entropy_threshold={self.entropy_threshold}, "
            f"pass2_arch={self.pass2_arch!r}, threshold_granularity={self.threshold_granularity!r})"
        )

    # ------------------------------------------------------------------------------------------------ text side
    def set_text(self, class_embeddings: Tensor, atp_embeddings: Tensor | None = None) -> None:
        """Set the queries of S0: the vocabulary's ``(K, E)`` embeddings and the ATP ``(80, E)`` embeddings.

        Rows are L2-normalised here. ``atp_embeddings`` is needed when ``atp`` is on (§13).
        """
        if class_embeddings.dim() != 2:
            raise ValueError(f"class_embeddings must be (K, E), got {tuple(class_embeddings.shape)}")
        if atp_embeddings is not None and (atp_embeddings.dim() != 2 or atp_embeddings.shape[1] != class_embeddings.shape[1]):
            raise ValueError(
                f"atp_embeddings must be (n, {class_embeddings.shape[1]}), got {tuple(atp_embeddings.shape)}"
            )
        self.class_embeddings = F.normalize(class_embeddings.detach(), dim=-1)
        self.atp_embeddings = F.normalize(atp_embeddings.detach(), dim=-1) if atp_embeddings is not None else None

    def set_vocabulary(self, model: nn.Module, vocabulary: Any, tokenizer: Any = None) -> None:
        """Embed ``vocabulary`` (and the ATP prompts when ``atp`` is on) with ``model``'s text tower; see set_text."""
        from cass_plugins.pipeline.text import default_tokenizer, encode_text

        tok = tokenizer if tokenizer is not None else default_tokenizer(None)
        classes = encode_text(model, tok, Vocabulary.parse(vocabulary))
        atp = encode_text(model, tok, atp_vocabulary()) if self.atp else None
        self.set_text(classes, atp)

    def query_embeddings(self, device: torch.device | None = None) -> Tensor:
        """``T_all`` ``(C, E)``: the classes followed by the ATP prompts when ``atp`` is on (§2)."""
        if self.class_embeddings is None:
            raise RuntimeError(
                "CDAM has no text embeddings: call cdam.set_vocabulary(model, vocabulary) (or set_text) first, "
                "or run it through a Segmenter, which hands over the vocabulary per image"
            )
        parts = [self.class_embeddings]
        if self.atp:
            if self.atp_embeddings is None:
                raise RuntimeError("atp=True but no ATP embeddings were given: pass them to set_text or use atp=False")
            parts.append(self.atp_embeddings)
        t = torch.cat(parts)
        return t.to(device) if device is not None else t

    # ------------------------------------------------------------------------------------------------ block side
    def initial_similarity(self, ctx: BlockContext, patch_output: Tensor) -> Tensor:
        """S0 ``(B, N, C)``: cosines of the projected pass-1 patch tokens with ``T_all`` (§3)."""
        feats = ctx.access.head(patch_output)
        # float64 models stay float64 (tests); fp16/bf16 models are lifted to float32 for the CDAM maps (§5, §18).
        feats = feats.to(torch.float64 if feats.dtype == torch.float64 else torch.float32)
        return cm.text_similarity(feats, self.query_embeddings(feats.device), drop_cls=False)

    def attention(self, similarity: Tensor, grid: tuple[int, int]) -> Tensor:
        """``W_patch`` ``(B, N, N)`` from S0 (§4-§8 restricted to the patch block; CLS gets no attention)."""
        w = cm.multiscale_cdam(
            similarity,
            grid,
            scales=self.scales if self.multiscale else (1.0,),
            class_temperature=self.class_temperature,
            attention_temperature=self.attention_temperature,
            minmax=self.minmax,
            multiscale_order=self.multiscale_order,  # type: ignore[arg-type]
            max_chunk_elements=self.max_chunk_elements,
        )
        if self.row_normalize:
            w = w / w.sum(dim=-1, keepdim=True).clamp_min(cm.MINMAX_EPS)
        return w

    def second_pass(self, ctx: BlockContext, attention: Tensor) -> Tensor:
        """Pass 2 (§9): the last block on its cached input with ``attention`` on the values → ``(B, N, D)``.

        The CLS column of the L×L CDAM matrix is zero (§8), so the patch rows only need the patch values; q and k
        are unused. All heads share the matrix.
        """
        v = ctx.patch_v  # (B, h, N, Dh) from ln_1 of the block input: the same values in both passes
        o = attention.to(v.dtype)[:, None] @ v
        a = ctx.access.out_proj(o)
        if self.pass2_arch == "reduced":
            return a
        return ctx.access.residual_mlp(ctx.x[:, ctx.num_prefix:], a)

    @hookimpl(wrapper=True)
    def cass_block_output(self, ctx: BlockContext) -> Generator[None, Tensor | None, Tensor | None]:
        """Wrap the baseline: its patch output is pass 1; return the pass-2 patch output."""
        patch1 = yield
        if patch1 is None:
            return None
        grid = tuple(ctx.grid)
        out_grid = tuple(ctx.output_grid) if ctx.output_grid is not None else grid
        if out_grid != grid or patch1.shape[1] != grid[0] * grid[1]:
            raise ValueError(
                f"CDAM needs the baseline's patch output on the CLIP grid {grid}, got {patch1.shape[1]} tokens on "
                f"{out_grid}: baselines that resample the tokens (ProxyCLIP) cannot feed its second pass"
            )
        if ctx.record.get("cdam"):
            # A second CDAM wrapper would run pass 3 on pass 2's output (e.g. a cdam-* preset plus plugins=[CDAM()]).
            raise RuntimeError("CDAM is registered twice on this model: use the component (components=['cdam']) or your own")
        s0 = self.initial_similarity(ctx, patch1)
        w = self.attention(s0, grid)
        ctx.record["cdam"] = True
        return self.second_pass(ctx, w)

    # ------------------------------------------------------------------------------------------------ image side
    @hookimpl
    def cass_begin_image(self, ctx: ImageContext) -> None:
        """Take the image's vocabulary (+ ATP) embeddings and reset the threshold state."""
        atp = ctx.embed_text(cm.ATP_PROMPTS) if self.atp else None
        self.set_text(ctx.text, atp)
        self.reset_threshold()

    @hookimpl(trylast=True)
    def cass_refine_logits(self, ctx: LogitsContext) -> None:
        """Track the entropy range of the window logits (after other logit components, so of what is thresholded)."""
        if not self.entropy_threshold:
            return
        b, q = ctx.logits.shape[:2]
        logits = ctx.logits.reshape(b, q, -1).transpose(1, 2)  # (B, N, Q)
        h = cm.patch_entropy(logits, entropy_scale=self.entropy_scale, log_base=self.entropy_log_base)
        lo, hi = h.amin(dim=-1), h.amax(dim=-1)
        if self.threshold_granularity == "image":
            lo, hi = lo.min(), hi.max()
            if self._range is not None:
                lo, hi = torch.minimum(lo, self._range[0]), torch.maximum(hi, self._range[1])
            self._range = (lo, hi)
            return
        for i in range(b):
            # (y1, x1) orders the windows in raster order whatever order the batches came in (§10 quirk).
            if ctx.windows is not None:
                y1, _, x1, _ = ctx.windows[i]
                key: tuple[int, ...] = (0, y1, x1)
            else:
                key = (1, self._windows_seen)
            self._windows_seen += 1
            if self._last_key is None or key >= self._last_key:
                self._last_key, self._range = key, (lo[i], hi[i])

    @hookimpl
    def cass_end_image(self, ctx: ImageContext) -> None:
        """Hand the image's entropy threshold to post-processing (replaces ``prob_thd``)."""
        thr = self.image_threshold()
        if thr is not None:
            ctx.prob_thd = thr
            ctx.record["cdam_threshold"] = thr
        self.reset_threshold()

    def reset_threshold(self) -> None:
        self._range, self._last_key, self._windows_seen = None, None, 0

    def image_threshold(self) -> float | None:
        """The threshold of the windows seen since the last reset (None when off or nothing was seen)."""
        if not self.entropy_threshold or self._range is None:
            return None
        thr = cm.threshold_from_entropy(
            self._range[0], self._range[1], alpha=self.alpha, default_threshold=self.default_threshold
        )
        return float(thr)

    def window_threshold(self, logits: Tensor) -> Tensor:
        """Entropy threshold of each window's ``(B, N, K)`` cosine logits, ``(B,)`` (§10; for use without a Segmenter)."""
        return cm.entropy_threshold(
            logits, entropy_scale=self.entropy_scale, log_base=self.entropy_log_base, alpha=self.alpha,
            default_threshold=self.default_threshold,
        )


# -------------------------------------------------------------------------------------------------------------------
# Vocabularies (§13, §14)
# -------------------------------------------------------------------------------------------------------------------


def atp_vocabulary() -> Vocabulary:
    """The 80 augmented prompts as a vocabulary (one query each; §13)."""
    return Vocabulary(tuple((p,) for p in cm.ATP_PROMPTS))


def cdam_vocabulary(dataset: str) -> Vocabulary:
    """The class names CDAM's authors use for ``dataset`` (§14), without the ATP block.

    ``Vocabulary.builtin(dataset, "cdam")``: VOC21 and COCO-Object have their own single-name lists (COCO-Object's
    background is "sky"); Context60's equals the shared file, and the datasets not in the repo use the shared files.
    """
    return Vocabulary.builtin(dataset, "cdam")


# -------------------------------------------------------------------------------------------------------------------
# Presets and the component ablation (§12, §15, §17)
# -------------------------------------------------------------------------------------------------------------------

#: Pass-1 baselines CDAM is preset on: the baseline's last block as the paper's rows name them (§15.2). The
#: authors' repository is "maskclip" (identity attention, residual and FFN kept); how they fused CDAM with SCLIP's
#: and ClearCLIP's attention is unpublished: here the baseline's own last block gives S0 and pass 2 is unchanged.
CDAM_BASELINES: dict[str, dict[str, Any]] = {
    "maskclip": {"baseline": "maskclip", "maskclip.arch": "vanilla"},
    "sclip": {"baseline": "sclip"},
    "clearclip": {"baseline": "clearclip"},
}

# The authors' protocol for every dataset (§11, §12): short side 448, 448/224 windows, ×50 logits, no PAMR; every
# CASS component off. ``prob_thd=0.5`` is the repo config's value: the entropy threshold overrides it, and it is the
# fixed threshold of the ablation rows without that component (an inference; the paper does not say).
_PROTOCOL: dict[str, Any] = {
    "components": ("cdam",), "logit_scale": 50.0, "prob_thd": 0.5,
    "area_thd": None, "short_side": 448, "max_long_side": 2048, "mode": "slide", "crop": 448, "stride": 224,
    "pamr_steps": 0, "class_files": "cdam",
}

#: Per-dataset values. VOC21 / Context60 / COCO-Object are the repo's configs; the no-background datasets are the
#: paper's Table 2 with thresholding off (§10, §12: the protocol values there are the spec's inference).
CDAM_DATASETS: dict[str, dict[str, Any]] = {
    "voc21": {},
    "context60": {},
    "coco_object": {},
    "coco_stuff164k": {"cdam.entropy_threshold": False, "prob_thd": 0.0},
    "cityscapes": {"cdam.entropy_threshold": False, "prob_thd": 0.0},
    "ade20k": {"cdam.entropy_threshold": False, "prob_thd": 0.0},
}

#: The paper-vs-repo switches of §15 (docs/cdam.md, "Paper-vs-repo switches"): what cdam-paper changes.
_PAPER_SWITCHES: dict[str, Any] = {
    "cdam.multiscale_order": "upsample_attention",
    "cdam.entropy_scale": 1.0 / cm.CLASS_TEMPERATURE,
    "cdam.entropy_log_base": math.e,
    "cdam.threshold_granularity": "image",
}

#: Method presets: ``cdam-<baseline>`` (the repo's switches) and ``cdam-paper`` (MaskCLIP + the paper's switches).
CDAM_PRESETS: dict[str, dict[str, Any]] = {
    **{f"cdam-{name}": {**block, **_PROTOCOL} for name, block in CDAM_BASELINES.items()},
    "cdam-paper": {**CDAM_BASELINES["maskclip"], **_PROTOCOL, **_PAPER_SWITCHES},
}

#: The paper's component ablation (Table 3) as overrides of any ``cdam-*`` preset, in order: the baseline alone,
#: + CDAM attention (single scale), + multi-scale, + augmented prompts, + entropy threshold (= the full preset).
#: The last row thresholds to class 0: use it with background datasets (the paper's Table 3 is VOC21).
CDAM_ABLATION: dict[str, dict[str, Any]] = {
    "baseline": {"cdam": False},
    "+cdam": {"cdam": True, "cdam.multiscale": False, "cdam.atp": False, "cdam.entropy_threshold": False},
    "+multiscale": {"cdam": True, "cdam.multiscale": True, "cdam.atp": False, "cdam.entropy_threshold": False},
    "+atp": {"cdam": True, "cdam.multiscale": True, "cdam.atp": True, "cdam.entropy_threshold": False},
    "+entropy_threshold": {"cdam": True, "cdam.multiscale": True, "cdam.atp": True, "cdam.entropy_threshold": True},
}


def _check_cdam(config: Any) -> None:
    """Refuse baselines that resample the patch tokens: CDAM's second pass needs them on the CLIP grid."""
    if config.baseline == "proxyclip":
        raise SettingError(
            "component 'cdam' cannot be combined with baseline 'proxyclip': ProxyCLIP's output lives on the VFM "
            "grid and CDAM's second pass needs the CLIP grid; use maskclip, sclip, clearclip, vanilla or naclip"
        )
    if config.pipeline.mode == "splice":
        raise SettingError(
            "component 'cdam' cannot run in mode='splice': its class-distribution attention acts on each window's "
            "logits, and splice mode has one map spliced before the head (docs/spec/trident.md §13); use "
            "mode=slide or mode=whole"
        )


COMPONENT = ComponentSpec(
    name="cdam", config_class=CDAMConfig, factory=CDAM, stage="block", check=_check_cdam,
    summary="CDAM: a class-distribution attention (JSD, multi-scale) and a second pass through the last block",
    legacy_toggle="cdam", legacy_keys={f"cdam_{name}": name for name in CDAMConfig.field_names()},
)


@hookimpl
def cass_register(registry: Registry) -> None:
    registry.add_component(COMPONENT)
    for name, values in CDAM_PRESETS.items():
        registry.add_preset(Preset(name, values, CDAM_DATASETS))
