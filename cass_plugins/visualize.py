"""Colour overlays with a legend, and palette label maps (Pillow only)."""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["palette", "overlay", "legend_overlay", "save_label_map"]


def palette(n: int) -> np.ndarray:
    """``n`` distinct RGB colours (uint8, ``(n, 3)``): golden-ratio hues, alternating lightness."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    rows = [colorsys.hls_to_rgb(h, 0.45 if i % 2 else 0.6, 0.85) for i, h in enumerate(hues)]
    return (np.array(rows).reshape(n, 3) * 255).round().astype(np.uint8)


def _as_numpy(image: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = image.permute(1, 2, 0).numpy() if image.dim() == 3 and image.shape[0] == 3 else image.numpy()
    return np.asarray(image)


def overlay(image: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours over ``image`` (uint8 ``(H, W, 3)`` or ``(3, H, W)``) → uint8 ``(H, W, 3)``."""
    img = _as_numpy(image).astype(np.float32)
    lab = _as_numpy(labels).astype(np.int64)
    if img.shape[:2] != lab.shape:
        raise ValueError(f"image {img.shape[:2]} and label map {lab.shape} differ in size")
    colours = palette(int(lab.max()) + 1).astype(np.float32)[lab]
    return np.clip((1 - alpha) * img + alpha * colours, 0, 255).round().astype(np.uint8)


def legend_overlay(
    image: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    class_names: Sequence[str],
    areas: dict[str, float] | None = None,
    alpha: float = 0.5,
    only_present: bool = True,
) -> Image.Image:
    """The overlay with a legend panel on the right: colour swatch, class name and area share per class."""
    blended = Image.fromarray(overlay(image, labels, alpha))
    colours = palette(len(class_names))
    lab = _as_numpy(labels)
    present = set(np.unique(lab).tolist())
    rows = [i for i in range(len(class_names)) if not only_present or i in present]
    font = ImageFont.load_default()
    line = 16
    names = [class_names[i] for i in rows]
    shares = [f"{100 * areas[n]:.1f}%" if areas and n in areas else "" for n in names]
    name_w = int(max((font.getlength(n) for n in names), default=0)) + 1
    share_w = int(max((font.getlength(t) for t in shares), default=0)) + 1
    width = 12 + 14 + 8 + name_w + 10 + share_w + 12
    height = max(blended.height, 8 + line * len(rows))
    canvas = Image.new("RGB", (blended.width + width, height), (255, 255, 255))
    canvas.paste(blended, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for r, (i, name, share) in enumerate(zip(rows, names, shares)):
        x, y = blended.width + 12, 6 + r * line
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(int(c) for c in colours[i]), outline=(0, 0, 0))
        draw.text((x + 22, y), name, fill=(0, 0, 0), font=font)
        if share:  # right-aligned in its own column
            draw.text((x + 22 + name_w + 10 + share_w - font.getlength(share), y), share, fill=(0, 0, 0), font=font)
    return canvas


def save_label_map(path: str | Path, labels: torch.Tensor | np.ndarray) -> None:
    """Write class indices as a palette PNG (pixel value = class index; viewers show the overlay colours)."""
    lab = _as_numpy(labels)
    if lab.max(initial=0) > 255:
        raise ValueError("more than 256 classes do not fit an 8-bit label PNG")
    img = Image.fromarray(lab.astype(np.uint8), mode="P")
    pal = np.zeros((256, 3), np.uint8)
    pal[: int(lab.max(initial=0)) + 1] = palette(int(lab.max(initial=0)) + 1)
    img.putpalette(pal.flatten().tolist())
    img.save(path)
