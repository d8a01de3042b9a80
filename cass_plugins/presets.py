"""Every knob of the pipeline in one flat, printable configuration, and the named presets (data, not code).

Sources: ../shared/spec/cass.md §6 (method presets) and §7 (per-dataset values); baselines.md §3 for baselines.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Config", "PRESETS", "DATASET_PRESETS", "resolve_config", "list_presets"]


@dataclass(frozen=True)
class Config:
    """The resolved configuration of a patched model and its segmentation pipeline.

    Every CASS component is a toggle, so each row of the paper's Table 3 is a configuration. Field groups:
    last block (``baseline`` … ``vfm_fp16_keys``), text/logits (``presence_prior`` … ``top_n``) and
    inference protocol (``logit_scale`` … ``window_batch``).
    """

    # --- last block: baseline ---
    baseline: str = "naclip"
    arch: str = "reduced"  # "reduced": Z = attention output; "vanilla": residual + FFN kept
    attn: str = "naclip"  # the baseline's attention (NACLIP: naclip|nonly|kk|csa|vanilla; see adapters.STRATEGIES)
    gaussian_std: float | None = 5.0  # Gaussian neighbourhood ω added to the logits; None = off
    include_cls: bool = True  # whether CLS takes part in the patch attention (CASS drops it)
    last_n_layers: int = 1  # ClearCLIP: sum the outputs of the last n blocks (only 1 is supported)
    proxy_beta: float = 1.2  # ProxyCLIP: S' = γ·(S − β·mean(S)) (baselines.md §1.5)
    proxy_gamma: float = 3.0
    # --- last block: CASS spectral object-level context distillation (cass.md §2) ---
    spectral: bool = True  # fuse the VFM graph at all
    # complementary | similar | sequential | explicit heads (one tuple) | one tuple per window | fn(cost, window)
    matching: str | tuple[int, ...] | tuple[tuple[int, ...], ...] | Callable[[Any, int], Any] = "complementary"
    tie_break: str | None = None  # None (plain solver) | "sequential" | "round"
    pairing: str = "official"  # "official" (w from the transposed cost entry) | "paper"
    solve_dtype: str = "float32"  # precision of the cost handed to the Hungarian solver
    lowrank: str | None = "randomized"  # randomized | exact | energy | eigengap | None (full graph)
    rank: int = 10
    lowrank_seed: int = 0
    energy_eta: float = 0.95
    eigenscaling: bool = True
    eigenscale_eps: float = 1.5
    fusion_lambda: float = 10.0
    spectrum_size: int = 20
    vfm_fp16_keys: bool = False  # round the VFM keys to fp16 as the authors' code does
    # --- last block: CDAM component (cdam.md; shared/spec/cdam.md); the defaults are the authors' repository ---
    cdam: bool = False  # CDAM attention + second pass through the last block, on top of the baseline
    cdam_multiscale: bool = True  # mean over cdam_scales; False: the full-resolution map only
    cdam_scales: tuple[float, ...] = (0.25, 0.37, 0.5, 0.63, 0.75, 0.87, 1.0)
    cdam_atp: bool = True  # the 80 augmented text prompts join the class distributions (not the logits)
    cdam_entropy_threshold: bool = True  # entropy-based background threshold replaces prob_thd
    cdam_class_temperature: float = 0.1  # τ of softmax_C(S0 / τ)
    cdam_attention_temperature: float = 0.1  # P of the row softmax of 1 − JSD
    cdam_minmax: bool = True  # row min-max before and after the softmax
    cdam_multiscale_order: str = "upsample_divergence"  # repo; "upsample_attention": the paper's Eq. 3
    cdam_row_normalize: bool = False  # the repo uses the CDAM matrix as is (rows sum to ≫ 1)
    cdam_pass2_arch: str = "vanilla"  # pass 2 keeps residual + FFN (repo); "reduced": attention output only
    cdam_entropy_scale: float = 50.0  # softmax scale before the entropy (repo 50; paper 1/τ = 10)
    cdam_entropy_log_base: float = 2.0  # bits (repo)
    cdam_alpha: float = 2.5  # thr = cdam_default_threshold · α / H_center
    cdam_default_threshold: float = 0.5
    cdam_threshold_granularity: str = "last_window"  # repo: the raster-last window's; "image": all windows
    # --- text and logits (cass.md §3-4) ---
    presence_prior: bool = True  # OPS
    gamma: float = 0.2
    prior_source: str = "image"  # "image": whole image, once per image; "crop": each window's own embedding
    ota: bool = True  # OTA
    alpha: float = 0.02
    h_threshold: float = 0.1
    top_n: int = 2
    # --- inference protocol (cass.md §5, protocol.md §6-8) ---
    logit_scale: float = 40.0
    prob_thd: float = 0.0
    area_thd: float | None = None
    short_side: int = 336
    max_long_side: int = 2048
    mode: str = "slide"  # "slide" | "whole"
    crop: int = 224
    stride: int = 112
    pamr_steps: int = 0
    pamr_dilations: tuple[int, ...] = (8, 16)
    window_batch: int = 8
    dataset: str | None = None
    class_files: str = "cass"  # whose packaged class files the dataset uses (Vocabulary.builtin(method=...))

    def replace(self, **overrides: Any) -> "Config":
        """A copy with ``overrides`` applied; unknown keys raise a ValueError listing the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown configuration key(s) {unknown}; valid keys: {sorted(names)}")
        if "matching" in overrides and isinstance(overrides["matching"], (list, tuple)):
            overrides["matching"] = tuple(
                tuple(m) if isinstance(m, (list, tuple)) else m for m in overrides["matching"]
            )
        for key in ("pamr_dilations", "cdam_scales"):
            if key in overrides:
                overrides[key] = tuple(overrides[key])
        cfg = dataclasses.replace(self, **overrides)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent value."""
        for f in dataclasses.fields(self):
            # a string "false" from a command line is truthy: booleans must really be booleans
            if isinstance(f.default, bool) and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name} must be True or False, got {getattr(self, f.name)!r}")
        choices = {
            "arch": ("reduced", "vanilla"),
            "pairing": ("official", "paper"),
            "solve_dtype": ("float32", "float64"),
            "lowrank": ("randomized", "exact", "energy", "eigengap", None),
            "tie_break": (None, "sequential", "round"),
            "prior_source": ("image", "crop"),
            "mode": ("slide", "whole"),
            "cdam_multiscale_order": ("upsample_divergence", "upsample_attention"),
            "cdam_pass2_arch": ("vanilla", "reduced"),
            "cdam_threshold_granularity": ("last_window", "image"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {allowed}")
        _validate_matching(self.matching)
        if not self.cdam_scales or not all(0.0 < m <= 1.0 for m in self.cdam_scales):
            raise ValueError(f"cdam_scales={self.cdam_scales!r}: give one or more scales in (0, 1]")
        if self.crop <= 0 or self.stride <= 0:
            raise ValueError("crop and stride must be positive")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.alpha <= 1.0:
            raise ValueError("gamma and alpha are blend weights in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """The resolved configuration as indented JSON (what users print to see every knob)."""
        return json.dumps(self.to_dict(), indent=2, default=str)


def _validate_matching(matching: Any) -> None:
    """``matching``: a strategy, one explicit assignment, one assignment per window, or a callable."""
    if callable(matching) or matching in ("complementary", "similar", "sequential"):
        return

    def heads(value: Any) -> bool:
        return isinstance(value, tuple) and bool(value) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )

    if heads(matching) or (isinstance(matching, tuple) and matching and all(heads(m) for m in matching)):
        return
    raise ValueError(
        f"matching={matching!r}: use 'complementary', 'similar', 'sequential', a sequence of VFM head indices "
        "(one per CLIP head), a list of such sequences (one per window), or a callable fn(cost, window_index)"
    )


# Method presets: cass.md §6. The Config defaults are cass-official's last-block values.
PRESETS: dict[str, dict[str, Any]] = {
    # CASS's last block drops CLS from the patch attention (cass.md §1).
    "cass-official": {"include_cls": False},
    "cass-paper": {
        "include_cls": False,
        "attn": "kk",  # Eq. 2 has no Gaussian window: NACLIP's key-key strategy without ω
        "gaussian_std": None,
        "lowrank": "energy",
        "fusion_lambda": 1.0,
        "pairing": "paper",
    },
}

# Per-dataset values (cass.md §7). Keys are merged over the method preset.
_CASS_DATASETS: dict[str, dict[str, Any]] = {
    "voc21": dict(gamma=0.10, alpha=0.03, h_threshold=0.10, prob_thd=0.1, short_side=336, mode="whole"),
    "voc20": dict(gamma=0.40, alpha=0.02, h_threshold=0.10, prob_thd=0.0, short_side=336, eigenscaling=False),
    "context60": dict(gamma=0.25, alpha=0.04, h_threshold=0.09, prob_thd=0.1, short_side=336),
    "context59": dict(gamma=0.25, alpha=0.04, h_threshold=0.09, prob_thd=0.0, short_side=336),
    "coco_object": dict(gamma=0.25, alpha=0.01, h_threshold=0.10, prob_thd=0.1, short_side=336),
    "coco_stuff164k": dict(gamma=0.20, alpha=0.02, h_threshold=0.02, prob_thd=0.0, short_side=336),
    "cityscapes": dict(
        gamma=0.10, alpha=0.03, h_threshold=0.14, prob_thd=0.0, short_side=560, prior_source="crop", eigenscaling=False
    ),
    "ade20k": dict(gamma=0.30, alpha=0.05, h_threshold=0.06, prob_thd=0.0, short_side=336),
}

DATASET_PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("cass-official", name): values for name, values in _CASS_DATASETS.items()
}
# cass-paper: eigenscaling is on for every dataset (cass.md §6); the other values are shared (§9).
DATASET_PRESETS.update(
    {("cass-paper", name): {k: v for k, v in values.items() if k != "eigenscaling"} for name, values in _CASS_DATASETS.items()}
)


def register_preset(name: str, values: dict[str, Any], datasets: dict[str, dict[str, Any]] | None = None) -> None:
    """Add a method preset (and optionally its per-dataset values); used by the adapters and plugins."""
    Config().replace(**values)  # validate keys early
    PRESETS[name] = dict(values)
    for ds, vals in (datasets or {}).items():
        DATASET_PRESETS[(name, ds)] = dict(vals)


def _load_builtin_presets() -> None:
    # The baselines (and built-in components) register their presets when the adapters are imported.
    from .plugins import load_builtin_plugins

    load_builtin_plugins()


def list_presets() -> list[str]:
    _load_builtin_presets()
    return sorted(PRESETS)


def resolve_config(preset: str | Config = "cass-official", dataset: str | None = None, **overrides: Any) -> Config:
    """Resolve ``preset`` (+ ``dataset`` values) + ``overrides`` into a validated :class:`Config`.

    Raises:
        ValueError: unknown preset, dataset or key, each naming the valid choices.
    """
    if isinstance(preset, Config):
        base = preset
    else:
        if preset not in PRESETS:
            _load_builtin_presets()
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; available: {list_presets()}")
        base = Config().replace(**PRESETS[preset])
    if dataset is not None:
        key = (preset, dataset) if isinstance(preset, str) else None
        known = sorted({d for (p, d) in DATASET_PRESETS if p == preset})
        if key not in DATASET_PRESETS:
            raise ValueError(f"no {dataset!r} values for preset {preset!r}; datasets with values: {known}")
        base = base.replace(dataset=dataset, **DATASET_PRESETS[key])
    return base.replace(**overrides) if overrides else base
