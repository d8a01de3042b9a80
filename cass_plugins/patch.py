"""``patch_clip``: attach a baseline and CASS components to any CLIP ViT; ``encode_dense``: read dense features."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .backbone import ViTAccess, vit_access
from .hooks import LastBlockHook, PatchState, SpectralAttentionHook, VFMRunner
from .matching import HeadMatching
from .plugins import REGISTRY, make_plugin_manager
from .presets import Config, resolve_config

__all__ = ["patch_clip", "PatchHandle", "encode_dense", "DenseOutput", "image_embedding", "get_patch", "COMPONENTS"]

_HANDLE_ATTR = "_cass_patch_handle"

#: Component names accepted by ``patch_clip(components=...)`` and the Config toggle each one sets.
COMPONENTS: dict[str, str] = {"spectral": "spectral", "ops": "presence_prior", "ota": "ota", "cdam": "cdam"}


class PatchHandle:
    """What ``patch_clip`` returns: owns every hook handle, the plugin manager and the resolved config.

    Use as a context manager or call :meth:`remove`; afterwards the model is exactly the unpatched model.

    Attributes:
        model: the patched model.
        config: the resolved :class:`~cass_plugins.presets.Config`.
        access: backbone access of the CLIP image tower.
        pm: the plugin manager (baseline + components); add third-party plugins with ``pm.register``.
        handles: every ``RemovableHandle`` this patch installed (timm ``FeatureHooks`` style).
        vfm: the :class:`~cass_plugins.hooks.VFMRunner` or ``None``.
    """

    def __init__(self, model: nn.Module, access: ViTAccess, config: Config, vfm: VFMRunner | None) -> None:
        self.model, self.access, self.config, self.vfm = model, access, config, vfm
        self.pm = make_plugin_manager()
        self.state = PatchState()
        self.handles: list[RemovableHandle] = []
        self.baseline: Any = None
        self.spectral: SpectralAttentionHook | None = None
        self._removed = False

    # ------------------------------------------------------------------------------------------------ inspection
    @property
    def last_matching(self) -> list[HeadMatching]:
        """Head matching of every image of the last forward: cost (rows VFM, columns CLIP heads), assignment,
        fusion weights, low-rank ranks and margin (0 = tied optimum). Empty without spectral distillation."""
        return list(self.spectral.last_matching) if self.spectral is not None else []

    def reset_windows(self) -> None:
        """Start counting windows from 0 again (call before the first crop of each image when a per-window
        ``matching`` list or callable should see the image's own window numbers)."""
        self.state.windows_seen = 0

    @property
    def output_grid(self) -> tuple[int, int] | None:
        return self.state.output_grid

    # ------------------------------------------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        """Remove every hook and plugin; the model's outputs are bit-identical to the unpatched model's again."""
        if self._removed:
            return
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for plugin in list(self.pm.get_plugins()):
            self.pm.unregister(plugin)
        if getattr(self.access.module, _HANDLE_ATTR, None) is self:
            delattr(self.access.module, _HANDLE_ATTR)
        self.state = PatchState()
        self._removed = True

    @property
    def active(self) -> bool:
        return not self._removed

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def bypassed(self) -> "_Bypass":
        """Context manager running the unmodified last block (e.g. for a whole-image embedding)."""
        return _Bypass(self.state)

    def __repr__(self) -> str:
        plugins = [type(p).__name__ for p in self.pm.get_plugins()]
        return f"PatchHandle(baseline={self.config.baseline!r}, plugins={plugins}, active={self.active})"


class _Bypass:
    def __init__(self, state: PatchState) -> None:
        self.state = state

    def __enter__(self) -> None:
        self.prev, self.state.bypass = self.state.bypass, True

    def __exit__(self, *exc: object) -> None:
        self.state.bypass = self.prev


def get_patch(model: nn.Module) -> PatchHandle | None:
    """The active :class:`PatchHandle` of ``model`` (or its image tower), if any."""
    visual = getattr(model, "visual", model)
    for m in (visual, getattr(visual, "trunk", None)):
        handle = getattr(m, _HANDLE_ATTR, None) if m is not None else None
        if handle is not None:
            return handle
    return None


def patch_clip(
    model: nn.Module,
    vfm: nn.Module | None = None,
    preset: str | Config = "cass-official",
    *,
    dataset: str | None = None,
    baseline: str | None = None,
    components: Iterable[str] | None = None,
    plugins: Sequence[object] = (),
    **overrides: Any,
) -> PatchHandle:
    """Patch a CLIP ViT's last block with a baseline and CASS components.

    Args:
        model: an open_clip CLIP model, an OpenAI-clip-style model, or an image tower (also timm-based).
        vfm: the vision foundation model whose last-block keys CASS distils (e.g. timm ``vit_base_patch8_224.dino``).
            Needed when spectral distillation is on.
        preset: a preset name (``"cass-official"`` default, ``"cass-paper"``, a baseline name) or a ``Config``.
        dataset: merge that dataset's values of the preset (cass.md §7).
        baseline: the last-block baseline (``"naclip"``, ``"sclip"``, ...); its block defaults are applied.
        components: components to switch on, any of ``"spectral"``, ``"ops"``, ``"ota"``, ``"cdam"``; the others
            are switched off. ``None`` keeps the preset's toggles.
        plugins: extra pluggy plugin objects (third-party components) to register.
        **overrides: any :class:`~cass_plugins.presets.Config` field (``matching=``, ``lowrank=``,
            ``fusion_lambda=``, ``eigenscaling=``, ``gaussian_std=`` ...).

    Returns:
        a :class:`PatchHandle` (context manager, ``remove()``).

    Raises:
        RuntimeError: the model is already patched.
        TypeError: the model is not a supported ViT.
        ValueError: inconsistent configuration (e.g. spectral distillation without a VFM).
    """
    access = vit_access(model)
    if get_patch(model) is not None:
        raise RuntimeError("this model is already patched; call remove() on its handle (or leave its `with` block) first")
    config = resolve_config(preset, dataset)
    if baseline is not None:
        factory = REGISTRY.baseline(baseline)
        config = config.replace(baseline=baseline, **getattr(factory, "block_defaults", {}))
    if components is not None:
        components = set(components)
        unknown = components - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown component(s) {sorted(unknown)}; choose from {sorted(COMPONENTS)}")
        config = config.replace(**{flag: name in components for name, flag in COMPONENTS.items()})
    if overrides:
        config = config.replace(**overrides)
    factory = REGISTRY.baseline(config.baseline)
    check = getattr(factory, "check_config", None)
    if check is not None:
        check(config, vfm=vfm)  # before any hook is installed: a bad combination leaves nothing behind
    if config.spectral:
        if not getattr(factory, "supports_spectral", True):
            why = getattr(factory, "spectral_note", "")
            raise ValueError(
                f"baseline {config.baseline!r} has no attention graph to fuse the VFM graph into{': ' + why if why else ''}"
            )
        if vfm is None:
            raise ValueError("spectral distillation needs a VFM: pass vfm=<timm ViT, e.g. DINO ViT-B/8> or spectral=False")
        config = config.replace(include_cls=False)  # the VFM graph covers patch tokens only (cass.md §9)
    runner = VFMRunner(vfm) if vfm is not None and (config.spectral or getattr(factory, "needs_vfm", False)) else None

    handle = PatchHandle(model, access, config, runner)
    try:
        handle.baseline = factory(config) if not getattr(factory, "needs_vfm", False) else factory(config, runner)
    except Exception:
        if runner is not None:
            runner.remove()  # the VFM must not keep our pre-hook when the baseline refuses the configuration
        raise
    handle.pm.register(handle.baseline, name="baseline")
    if config.spectral:
        handle.spectral = SpectralAttentionHook(runner, config)
        handle.pm.register(handle.spectral, name="spectral")
    if config.cdam:
        handle.pm.register(REGISTRY.component("cdam")(config), name="cdam")
    for i, plugin in enumerate(plugins):
        handle.pm.register(plugin, name=f"user-{i}")

    block_hook = LastBlockHook(access, handle.pm, handle.state)
    handle.handles.append(access.patch_embed.register_forward_pre_hook(block_hook.observe_images))
    handle.handles.append(access.last_block.register_forward_hook(block_hook))
    if runner is not None:
        handle.handles.append(runner.handle)
    setattr(access.module, _HANDLE_ATTR, handle)
    return handle


@dataclass
class DenseOutput:
    """``features`` ``(B, gh, gw, d)`` projected per-patch features; ``image_embeds`` ``(B, d)``."""

    features: Tensor
    image_embeds: Tensor


def encode_dense(model: nn.Module, images: Tensor) -> DenseOutput:
    """Projected per-patch features and image embeddings of a batch of CLIP-normalised crops.

    Works on patched and unpatched models; the positional embedding is interpolated to any grid (the "+0.1"
    rule, baselines.md §2). For an unpatched model the features are vanilla CLIP's last-block tokens.
    """
    handle = get_patch(model)
    access = handle.access if handle is not None else vit_access(model)
    tokens, grid = access.embed(images)
    tokens = access.run_blocks(tokens, access.blocks)
    projected = access.head(tokens)
    out_grid = handle.state.output_grid if handle is not None and not handle.state.bypass else None
    out_grid = out_grid or grid
    patches = projected[:, access.num_prefix_tokens:]
    if patches.shape[1] != out_grid[0] * out_grid[1]:
        raise RuntimeError(f"{patches.shape[1]} patch tokens do not fill the output grid {out_grid}")
    return DenseOutput(patches.reshape(patches.shape[0], *out_grid, -1), projected[:, 0])


def image_embedding(model: nn.Module, images: Tensor) -> Tensor:
    """The unmodified model's image embedding ``(B, d)`` (CLS → ln_post → proj) at any input size."""
    handle = get_patch(model)
    if handle is None:
        return encode_dense(model, images).image_embeds
    with handle.bypassed():
        return encode_dense(model, images).image_embeds
