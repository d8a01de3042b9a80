"""Tiny random-weight SAMs for tests (spec trident.md §14: img_size 256, patch 16, width 64, depth 2, 4 heads,
window 4, global block 1, rel-pos; prompt encoder and decoder of width 32; grid 16×16, low-res mask 64×64).

SAM initialises ``pos_embed`` and every ``rel_pos_h``/``rel_pos_w`` to zeros; the helpers here re-randomise them so
that tests of the positional terms can fail.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from cass_plugins.backbone.sam import SamBackbone, build_sam

TINY_SAM_KIND = "test"
TINY_SAM_GRID = 16
TINY_SAM_LOW_RES = 4 * TINY_SAM_GRID


def randomize_positions_(model: nn.Module, seed: int = 0, rel_std: float = 0.5, abs_std: float = 0.2) -> nn.Module:
    """Fill the (zero-initialised) absolute and relative position parameters with random values, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("rel_pos_h", "rel_pos_w")):
                param.copy_(torch.randn(param.shape, generator=gen) * rel_std)
            elif name.endswith("pos_embed"):
                param.copy_(torch.randn(param.shape, generator=gen) * abs_std)
    return model


def make_tiny_sam_model(seed: int = 0, backend: str = "segment_anything") -> nn.Module:
    """The raw tiny model (a segment_anything ``Sam`` or a timm ``VisionTransformerSAM``), positions randomised."""
    torch.manual_seed(seed)
    return randomize_positions_(build_sam(TINY_SAM_KIND, backend), seed)


def make_tiny_sam(seed: int = 0, backend: str = "segment_anything") -> SamBackbone:
    """A tiny :class:`SamBackbone` with random weights and random position parameters (float32, CPU)."""
    return SamBackbone(make_tiny_sam_model(seed, backend), kind=TINY_SAM_KIND)


def tiny_sam_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A Meta-format (``image_encoder.`` / ``prompt_encoder.`` / ``mask_decoder.``) random state dict."""
    return {k: v.clone() for k, v in make_tiny_sam_model(seed, "segment_anything").state_dict().items()}


def save_tiny_sam_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Save :func:`tiny_sam_state_dict` with ``torch.save``, as Meta's ``sam_vit_*.pth`` files are stored."""
    path = Path(path)
    torch.save(tiny_sam_state_dict(seed), path)
    return path


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB uint8 ``(H, W, 3)`` image (blobs, so resizes are not pure noise)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, height // 8), max(2, width // 8), generator=gen) * 255
    img = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    img = img + torch.rand(1, 3, height, width, generator=gen) * 30 - 15
    return img[0].clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy().copy()
