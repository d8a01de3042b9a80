"""Running a vision foundation model (DINO, DINOv2 … as timm ViTs) on CLIP-normalised crops: its last-block keys
(CASS, docs/spec/cass.md §2.1) or final-norm features (ProxyCLIP, docs/spec/baselines.md §1.5)."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from cass_plugins.backbone.access import vit_access
from cass_plugins.backbone.normalization import (
    CLIP_MEAN_255, CLIP_STD_255, IMAGENET_MEAN, IMAGENET_STD, to_vfm_normalization,
)

__all__ = ["VFMRunner", "resize_keys"]


class _KeysCaptured(Exception):
    """Raised by the VFM's last-block pre-hook: nothing after the keys is needed."""


class VFMRunner:
    """Runs a vision foundation model on CLIP-normalised crops and returns its last-block keys or features.

    The last block's input is captured by a forward pre-hook (its handle lives in :attr:`handle`); when only keys
    are wanted the hook stops the forward there, so the VFM's last block and head never run.

    Args:
        vfm: a timm ViT (DINO v1/v2, with or without registers).
        mean, std: the VFM's input normalisation (0–1 scale).
        clip_mean, clip_std: the constants the crops' CLIP normalisation is undone with (0–255 scale); a baseline
            whose authors undo it differently declares its own (:attr:`Baseline.vfm_input`, ProxyCLIP).
        pos_interp: positional-embedding interpolation rule (see :func:`~cass_plugins.backbone.access.vit_access`).
    """

    def __init__(
        self,
        vfm: nn.Module,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        clip_mean: Sequence[float] = CLIP_MEAN_255,
        clip_std: Sequence[float] = CLIP_STD_255,
        pos_interp: str | None = None,
    ) -> None:
        self.model = vfm
        self.access = vit_access(vfm, pos_interp=pos_interp)
        self.mean, self.std = tuple(mean), tuple(std)
        self.clip_mean, self.clip_std = tuple(clip_mean), tuple(clip_std)
        self._captured: Tensor | None = None
        self._stop = False
        self.handle = self.access.last_block.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self._captured = args[0]
        if self._stop:
            raise _KeysCaptured

    def remove(self) -> None:
        self.handle.remove()

    def prepare(self, clip_images: Tensor, square: bool) -> Tensor:
        """CLIP-normalised crops → the VFM's normalisation, optionally resized to a square of the short side."""
        x = to_vfm_normalization(clip_images.float(), self.mean, self.std, self.clip_mean, self.clip_std)
        if square:
            side = min(x.shape[-2:])
            if x.shape[-2] != side or x.shape[-1] != side:
                x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=False)
        return x.to(self.access.dtype)

    def _run(self, x: Tensor, stop: bool) -> tuple[Tensor, tuple[int, int]]:
        acc = self.access
        tokens, grid = acc.embed(x)
        self._stop = stop
        try:
            tokens = acc.run_blocks(tokens, acc.blocks)
        except _KeysCaptured:
            tokens = None
        finally:
            self._stop = False
        return (tokens if tokens is not None else self._captured), grid

    def keys(self, clip_images: Tensor, square: bool = True) -> tuple[Tensor, tuple[int, int]]:
        """Last-block attention keys of the patch tokens ``(B, h_v, N_v, Dh_v)`` and the VFM grid (cass.md §2.1)."""
        x = self.prepare(clip_images, square)
        last_in, grid = self._run(x, stop=True)
        _, k, _ = self.access.qkv(self.access.to_batch_first(last_in))
        return k[:, :, self.access.num_prefix_tokens:], grid

    def features(self, clip_images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Final-norm output of the last block for the patch tokens, ``(B, C, gh, gw)`` (ProxyCLIP's ``E``)."""
        x = self.prepare(clip_images, square=False)
        tokens, grid = self._run(x, stop=False)
        norm = self.access.final_norm
        tokens = norm(tokens) if norm is not None else tokens
        patches = tokens[:, self.access.num_prefix_tokens:]
        return patches.transpose(1, 2).reshape(patches.shape[0], -1, *grid), grid


def resize_keys(keys: Tensor, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    """Bilinearly resize per-head key maps ``(B, h, Ns, Dh)`` from grid ``src`` to ``dst`` (cass.md §2.2)."""
    if tuple(src) == tuple(dst):
        return keys
    b, h, _, dh = keys.shape
    maps = keys.permute(0, 1, 3, 2).reshape(b, h * dh, *src)
    maps = F.interpolate(maps.float(), size=dst, mode="bilinear", align_corners=False).to(keys.dtype)
    return maps.reshape(b, h, dh, dst[0] * dst[1]).permute(0, 1, 3, 2)
