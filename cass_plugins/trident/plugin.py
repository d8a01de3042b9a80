"""Trident's built-in plugin: the ``sam_aggregate`` and ``sam_refine`` components and the ``trident`` presets.

Trident (Shi et al., ICCV 2025, "splice-then-segment"; authors' ``trident.py``; docs/spec/trident.md):

- ``mode='splice'`` (the pipeline, :mod:`cass_plugins.trident.pipeline`): all windows of an image through the
  patched last block in one forward, their outputs averaged before ``ln_post``/``proj`` (§4);
- ``sam_aggregate`` — the spliced map resized to SAM's valid grid and aggregated with the affinity of SAM's
  last-block attention and values (§5.3, §6): :class:`SamAggregate`, settings :class:`SamAggregateConfig`;
  needs splice mode (there is no spliced pre-head map otherwise);
- ``sam_refine`` — SAM prompts from the coarse probabilities and labels, masks merged back (§8):
  :class:`SamRefine`, settings :class:`~cass_plugins.trident.refine.SamRefineConfig`; any mode and baseline.

Both read one SAM encoder pass per image (``LabelContext.sam`` / ``SplicedContext.sam``).

Presets ``trident`` (refinement on, as every published number) and ``trident-coarse`` (off), with the per-dataset
values of §9.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cass_plugins.core.hookspecs import LabelContext, SplicedContext, hookimpl
from cass_plugins.core.registry import ComponentSpec, Preset, Registry
from cass_plugins.core.settings import Settings, SettingError, setting

from .affinity import aggregate, sam_affinity
from .refine import SamRefineConfig, refine_labels

__all__ = ["COMPONENTS", "PRESETS", "SamAggregate", "SamAggregateConfig", "SamRefine", "cass_register"]


@dataclass(frozen=True)
class SamAggregateConfig(Settings):
    """Settings of the SAM aggregation (``sam_aggregate``; docs/spec/trident.md §5.3, §9)."""

    cos_fac: float = setting(1.2, finite=True, doc="ε_i = cos_fac · mean over heads and keys of C_h,i· (VOC20: 0)")
    neg_fallback: float | None = setting(
        None, finite=True, doc="ε_i below 0 replaced by this (refine_neg_cos=False ⇔ 0.6; None keeps them)"
    )
    thresh_cap: float = setting(0.9, range=(None, 1.0), exclusive=True, doc="ε_i capped at this (below 1)")
    split: str = setting(
        "none", choices=("none", "halves"), doc="'halves': SAM on the left and right half separately (Cityscapes, §5.1)"
    )


def _no_sam(component: str) -> ValueError:
    return ValueError(
        f"{component} needs a SAM model: pass sam=cass_plugins.load_sam('vit_b', checkpoint='sam_vit_b_01ec64.pth') "
        "to the Segmenter (cass-segment/cass-eval: --sam-weights FILE), or switch the component off"
    )


class SamAggregate:
    """``sam_aggregate``: ``Z̃ = A·resize(I_feat)`` on SAM's valid grid (§6), one ``A`` per SAM part (§5.3)."""

    def __init__(self, settings: SamAggregateConfig, runtime: Any = None) -> None:
        self.config = settings

    @hookimpl
    def cass_aggregate_features(self, ctx: SplicedContext) -> None:
        if ctx.sam is None:
            raise _no_sam("sam_aggregate")
        encoding = ctx.sam()
        cfg = self.config
        affinities = [sam_affinity(part, cfg.cos_fac, cfg.neg_fallback, cfg.thresh_cap) for part in encoding.parts]
        grids = [tuple(part.grid) for part in encoding.parts]
        ctx.features = aggregate(ctx.features, affinities, grids)
        ctx.record["sam_grids"] = grids


class SamRefine:
    """``sam_refine``: SAM prompt refinement of the decided labels (§8)."""

    def __init__(self, settings: SamRefineConfig, runtime: Any = None) -> None:
        self.config = settings

    @hookimpl
    def cass_refine_labels(self, ctx: LabelContext) -> None:
        if ctx.sam is None:
            raise _no_sam("sam_refine")
        encoding = ctx.sam()
        if encoding.predictor is None:
            raise ValueError(
                "sam_refine needs SAM's prompt encoder and mask decoder: load SAM with the segment-anything backend "
                '(pip install "cass_plugins[sam]"; load_sam(..., backend="segment_anything")); a timm SAM encoder '
                "serves sam_aggregate only"
            )
        labels, info = refine_labels(ctx.probs, ctx.labels, encoding.predictor, self.config)
        ctx.labels = labels
        ctx.record["sam_refine"] = info


def _check_aggregate(config: Any) -> None:
    if config.pipeline.mode != "splice":
        raise SettingError(
            f"sam_aggregate acts on the window features spliced before the head, which only mode='splice' builds "
            f"(mode is {config.pipeline.mode!r}): set mode=splice, or use sam_refine, which works in every mode"
        )


COMPONENTS = (
    ComponentSpec(
        name="sam_aggregate", config_class=SamAggregateConfig, factory=SamAggregate,
        summary="Trident SAM aggregation: the spliced pre-head map aggregated with SAM's last-block affinity",
        check=_check_aggregate, needs_sam=True,
    ),
    ComponentSpec(
        name="sam_refine", config_class=SamRefineConfig, factory=SamRefine,
        summary="Trident SAM refinement: SAM masks prompted from the coarse labels replace them where confident",
        needs_sam=True,
    ),
)

# §9: the effective base values (configs/base_config.py over the constructor defaults) and the per-dataset table.
_BASE: dict[str, Any] = {
    "baseline": "proxyclip", "proxyclip.proxy_mean": "batch", "proxyclip.beta": 1.2, "proxyclip.gamma": 3.0,
    "mode": "splice", "crop": 336, "stride": 224, "short_side": 448, "logit_scale": 40.0, "prob_thd": 0.0,
    "area_thd": None, "pamr_steps": 0, "prior_source": "image", "class_files": "proxyclip",
    "sam_aggregate.cos_fac": 1.2, "sam_aggregate.neg_fallback": None, "sam_aggregate.split": "none",
    "sam_refine.coarse_thresh": 0.2,
}
_DATASETS: dict[str, dict[str, Any]] = {
    "voc21": {"short_side": 448, "prob_thd": 0.2, "sam_refine.coarse_thresh": 0.2},
    "context60": {"short_side": 576, "prob_thd": 0.15, "sam_refine.coarse_thresh": 0.15},
    "coco_object": {"short_side": 448, "prob_thd": 0.25, "sam_refine.coarse_thresh": 0.25},
    "voc20": {"short_side": 336, "stride": 112, "sam_aggregate.cos_fac": 0.0, "sam_refine.coarse_thresh": 0.2},
    "context59": {"short_side": 576, "sam_refine.coarse_thresh": 0.15},
    "coco_stuff164k": {"short_side": 448, "sam_refine.coarse_thresh": 0.05},
    "cityscapes": {"short_side": 688, "sam_aggregate.cos_fac": 3.0, "sam_aggregate.neg_fallback": 0.6,
                   "sam_aggregate.split": "halves", "sam_refine.coarse_thresh": 0.10},
    "ade20k": {"short_side": 576, "sam_aggregate.neg_fallback": 0.6, "sam_refine.coarse_thresh": 0.05},
}

#: The models Trident runs with (§9): DINO ViT-B/16 (not ProxyCLIP's B/8) and SAM ViT-B beside CLIP ViT-B/16.
MODELS: dict[str, str] = {"vfm": "vit_base_patch16_224.dino", "sam": "vit_b"}


def _without_refine(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if not k.startswith("sam_refine.")}


PRESETS: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]], str]] = {
    "trident": (
        {**_BASE, "components": ("sam_aggregate", "sam_refine")}, _DATASETS,
        "Trident as published: ProxyCLIP windows spliced, SAM aggregation, SAM refinement",
    ),
    "trident-coarse": (
        {**_without_refine(_BASE), "components": ("sam_aggregate",)},
        {name: _without_refine(values) for name, values in _DATASETS.items()},
        "Trident without the SAM refinement (paper Table 4, +Aff)",
    ),
}


@hookimpl
def cass_register(registry: Registry) -> None:
    for spec in COMPONENTS:
        registry.add_component(spec)
    for name, (values, datasets, summary) in PRESETS.items():
        registry.add_preset(Preset(name, values, datasets, summary=summary, models=MODELS))
