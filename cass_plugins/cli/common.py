"""What the command-line tools share: the model flags, the configuration flags and their one resolver, the
argparse parser that prints one-line errors."""
from __future__ import annotations

import argparse
import logging
from typing import Any, NoReturn, Sequence

import torch

from cass_plugins.backbone.loading import DEFAULT_CLIP, DEFAULT_VFM, load_clip, load_vfm
from cass_plugins.core.config import Config, list_presets, parse_overrides, resolve_config
from cass_plugins.core.registry import REGISTRY
from cass_plugins.core.settings import SettingError

__all__ = [
    "CliParser", "add_model_arguments", "models_from_args", "add_config_arguments", "config_from_args",
    "parse_components", "vfm_requested", "vfm_name", "sam_from_args",
]

log = logging.getLogger("cass_plugins")


class CliParser(argparse.ArgumentParser):
    """argparse without the multi-line usage dump on an error: the message and where to read more."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(run {self.prog} --help for the options)\n")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model flags shared by ``cass-segment``, ``cass-eval`` and ``cass-ablate``."""
    g = parser.add_argument_group("models")
    g.add_argument("--clip", default=DEFAULT_CLIP[0], help="open_clip model name (default: %(default)s)")
    g.add_argument(
        "--pretrained", default=DEFAULT_CLIP[1],
        help="open_clip pretrained tag (e.g. openai) or a local state-dict file (.pth/.bin/.safetensors); "
        "'random' for random weights (default: %(default)s)",
    )
    g.add_argument("--vfm", default=None, help="timm VFM name; 'none' switches off every component that needs one "
                   f"(spectral distillation) (default: the preset's, e.g. DINO B/16 for trident, else {DEFAULT_VFM})")
    g.add_argument("--vfm-weights", default="pretrained",
                   help="'pretrained' (download via timm), a local checkpoint file, or 'random' (default: %(default)s)")
    g.add_argument("--sam", default=None, choices=("vit_b", "vit_l", "vit_h", "test"),
                   help="SAM size for sam_aggregate / sam_refine (Trident) (default: the preset's, vit_b; 'test': a "
                   "tiny architecture for tests)")
    g.add_argument("--sam-weights", default=None, metavar="FILE",
                   help="local SAM checkpoint (Meta's sam_vit_b_01ec64.pth ...) or 'random'; needed by the SAM "
                   "components (SAM has no download here)")
    g.add_argument("--sam-backend", default=None, choices=("segment_anything", "timm"),
                   help="segment_anything (pip install \"cass_plugins[sam]\"; aggregation and refinement) or timm "
                   "(aggregation only) (default: segment_anything)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    g.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="precision of both towers; the spectral math stays float32 on CUDA (default: %(default)s)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks of both towers (all but the patched last ones); pays "
                        "off over many images on a GPU, costs minutes of compilation on a CPU")


def models_from_args(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """``(clip_model, tokenizer, vfm_or_None)`` from the shared flags."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was requested but no CUDA device is available; use --device cpu")
    if args.precision == "fp16" and str(args.device).startswith("cpu"):
        log.warning("--precision fp16 on CPU is slower than fp32 (CPUs lack fast half-precision kernels); "
                    "use fp32 on CPU")
    clip, tokenizer = load_clip(args.clip, args.pretrained, device=args.device, precision=args.precision)
    vfm = load_vfm(vfm_name(args), args.vfm_weights, device=args.device, precision=args.precision) if vfm_requested(args) else None
    return clip, tokenizer, vfm


def _preset_model(args: argparse.Namespace, role: str, default: str) -> str:
    name = getattr(args, "preset", None)
    if not name:
        return default
    REGISTRY.load()
    preset = REGISTRY.presets.get(name)  # an unknown preset is reported by the configuration's resolver
    return preset.models.get(role, default) if preset is not None else default


def vfm_name(args: argparse.Namespace) -> str:
    """``--vfm``, or the model the preset was published with (Trident: DINO ViT-B/16), or the default DINO B/8."""
    return getattr(args, "vfm", None) or _preset_model(args, "vfm", DEFAULT_VFM)


def vfm_requested(args: argparse.Namespace) -> bool:
    return vfm_name(args).lower() != "none"


def sam_from_args(args: argparse.Namespace, configs: Config | Sequence[Config]) -> Any:
    """The SAM model the configurations' SAM components need (``None`` when none is on).

    Raises:
        SettingError: ``--sam``/``--sam-weights`` given while no component uses SAM.
    """
    configs = [configs] if isinstance(configs, Config) else list(configs)
    from cass_plugins.trident.pipeline import sam_users

    users = [name for config in configs for name in sam_users(config)]
    given = [flag for flag, value in (("--sam", args.sam), ("--sam-weights", args.sam_weights),
                                      ("--sam-backend", args.sam_backend)) if value]
    if not users:
        if given:
            raise SettingError(
                f"{' and '.join(given)} given but no component uses SAM: use --preset trident, or --components "
                "...,sam_refine (any mode) / sam_aggregate (--set mode=splice)"
            )
        return None
    if "sam_refine" in users and args.sam_backend == "timm":
        raise SettingError(
            "sam_refine needs SAM's prompt encoder and mask decoder, which the timm backend lacks: drop "
            "--sam-backend timm (segment-anything: pip install \"cass_plugins[sam]\") or switch sam_refine off "
            "(--preset trident-coarse)"
        )
    from cass_plugins.backbone.sam import load_sam

    kind = args.sam or _preset_model(args, "sam", "vit_b")
    return load_sam(kind, args.sam_weights, backend=args.sam_backend or "segment_anything", device=args.device,
                    precision=args.precision)


def add_config_arguments(parser: argparse.ArgumentParser, *, dataset_flag: bool = True) -> None:
    """``--preset``, ``--dataset``, ``--baseline``, ``--components`` and ``--set`` (one resolver for every CLI)."""
    g = parser.add_argument_group("configuration")
    g.add_argument("--preset", default="cass-official", help=f"method preset: {', '.join(list_presets())}")
    if dataset_flag:
        g.add_argument("--dataset", help="use that dataset's values of the preset (docs/spec/cass.md §7)")
    g.add_argument("--baseline", help="last-block baseline: " + ", ".join(sorted(REGISTRY.baselines)))
    g.add_argument(
        "--components", default=None,
        help="components to switch on, comma-separated (the others off), or 'none': "
        + ", ".join(sorted(REGISTRY.components)) + " (default: the preset's)",
    )
    g.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE",
        help="override a setting: section.key=value (spectral.lowrank=exact, cdam.alpha=2.5, ops.gamma=0.3, "
        "crop=336); --print-config lists every key",
    )


def parse_components(text: str | None) -> list[str] | None:
    """``--components`` text → names (``None``: the preset's; ``'none'``: no component)."""
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return []
    return [c.strip() for c in text.replace(";", ",").split(",") if c.strip()]


def config_from_args(args: argparse.Namespace, dataset: str | None = None) -> Config:
    """The resolved configuration of the configuration flags, validated before any model loads.

    ``--vfm none`` switches off the components that need a VFM (asking for one explicitly is an error).

    Raises:
        SettingError: unknown preset, dataset, baseline, component or key, or a bad value (one line, naming it).
    """
    dataset = dataset if dataset is not None else getattr(args, "dataset", None)
    components = parse_components(getattr(args, "components", None))
    config = resolve_config(args.preset, dataset, baseline=args.baseline, components=components)
    overrides = parse_overrides(args.set, config)
    if overrides:
        config = config.replace(**overrides)
    if not vfm_requested(args):
        needing = [n for n in config.components if REGISTRY.component(n).needs_vfm]
        if components is not None and needing:
            raise SettingError(f"--components {','.join(needing)} need{'s' if len(needing) == 1 else ''} a VFM, "
                               "but --vfm none was given")
        if REGISTRY.baseline(config.baseline).needs_vfm:
            raise SettingError(f"baseline {config.baseline!r} needs a VFM, but --vfm none was given")
        if needing:
            config = config.replace(components=[n for n in config.components if n not in needing])
    return config
