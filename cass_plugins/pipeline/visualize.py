"""Colour overlays with a legend, and label maps (Pillow; the legend font is matplotlib's DejaVu Sans).

Legend font: DejaVu Sans (shipped with matplotlib, a dependency) covers Latin, Greek and Cyrillic. For class names with
characters it lacks (CJK, for instance) a system font that has them is used when one is installed (e.g. Debian's
``fonts-noto-cjk``); otherwise a one-line warning names those classes. No PyPI package ships a CJK font that is both
permissively licensed and maintained, so none is a dependency.
"""
from __future__ import annotations

import colorsys
import functools
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["palette", "overlay", "legend_overlay", "save_label_map", "legend_font_size", "missing_glyphs"]

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------------------------ fonts
def _dejavu_path() -> str:
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")


@functools.lru_cache(maxsize=None)
def _charmap(path: str) -> frozenset[int]:
    """The code points a font file has glyphs for (matplotlib's FreeType wrapper reads the cmap)."""
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(path).get_charmap())


def missing_glyphs(text: str, font_path: str | None = None) -> str:
    """The characters of ``text`` (whitespace aside) that the font file (default: DejaVu Sans) has no glyph for."""
    covered = _charmap(font_path or _dejavu_path())
    return "".join(dict.fromkeys(c for c in text if not c.isspace() and ord(c) not in covered))


@functools.lru_cache(maxsize=None)
def _system_fonts() -> tuple[str, ...]:
    from matplotlib import font_manager

    # CJK / Noto families first: those are the ones that fill DejaVu's gaps
    paths = sorted({f.fname for f in font_manager.fontManager.ttflist},
                   key=lambda p: (not any(s in p.lower() for s in ("cjk", "noto", "han", "unifont")), p))
    # Last Resort (shipped with matplotlib) maps every code point to a placeholder box: it covers nothing
    return tuple(p for p in paths if p.lower().endswith((".ttf", ".otf", ".ttc")) and "lastresort" not in p.lower())


def _font_for(text: str) -> str | None:
    """DejaVu Sans if it covers ``text``, else the first installed font that does, else ``None``."""
    if not missing_glyphs(text):
        return _dejavu_path()
    for path in _system_fonts():
        try:
            if not missing_glyphs(text, path):
                return path
        except (OSError, RuntimeError):  # unreadable font files are skipped
            continue
    return None


def legend_font_size(height: int, width: int) -> int:
    """Legend text height in pixels: 12 px up to ~840 px images, then 1/70 of the long side (86 px at 6000)."""
    return max(12, round(max(height, width) / 70))


def legend_overlay(
    image: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    class_names: Sequence[str],
    areas: dict[str, float] | None = None,
    alpha: float = 0.5,
    only_present: bool = True,
) -> Image.Image:
    """The overlay with a legend panel on the right: colour swatch, class name and area share per class.

    The text scales with the image (:func:`legend_font_size`). Names whose characters no available font has are
    drawn with DejaVu Sans anyway (boxes), and one warning names those classes.
    """
    blended = Image.fromarray(overlay(image, labels, alpha))
    colours = palette(len(class_names))
    lab = _as_numpy(labels)
    present = set(np.unique(lab).tolist())
    rows = [i for i in range(len(class_names)) if not only_present or i in present]
    size = legend_font_size(blended.height, blended.width)
    base = ImageFont.truetype(_dejavu_path(), size)
    names = [class_names[i] for i in rows]
    fonts, uncovered = [], []
    for n in names:
        path = _font_for(n)
        if path is None:
            uncovered.append(n)
        fonts.append(base if path in (None, _dejavu_path()) else ImageFont.truetype(path, size))
    if uncovered:
        log.warning("no installed font has glyphs for the legend names %s (install e.g. fonts-noto-cjk)", uncovered)
    shares = [f"{100 * areas[n]:.1f}%" if areas and n in areas else "" for n in names]
    pad, box, line = size, size, round(1.4 * size)
    name_w = int(max((f.getlength(n) for f, n in zip(fonts, names)), default=0)) + 1
    share_w = int(max((base.getlength(t) for t in shares), default=0)) + 1
    width = pad + box + pad // 2 + name_w + pad + share_w + pad
    height = max(blended.height, pad + line * len(rows))
    canvas = Image.new("RGB", (blended.width + width, height), (255, 255, 255))
    canvas.paste(blended, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for r, (i, name, share, font) in enumerate(zip(rows, names, shares, fonts)):
        x, y = blended.width + pad, pad // 2 + r * line
        draw.rectangle([x, y, x + box, y + box], fill=tuple(int(c) for c in colours[i]), outline=(0, 0, 0))
        draw.text((x + box + pad // 2, y), name, fill=(0, 0, 0), font=font)
        if share:  # right-aligned in its own column
            right = x + box + pad // 2 + name_w + pad + share_w
            draw.text((right - base.getlength(share), y), share, fill=(0, 0, 0), font=base)
    return canvas


# ------------------------------------------------------------------------------------------------- label maps
def save_label_map(path: str | Path, labels: torch.Tensor | np.ndarray) -> None:
    """Write class indices as a PNG whose pixel value is the class index.

    Up to 256 classes: an 8-bit palette PNG (viewers show the overlay colours). More: a 16-bit grayscale PNG
    (Pillow mode ``"I;16"``), up to 65536 classes. The format is PNG whatever the file name says.
    """
    lab = _as_numpy(labels)
    top = int(lab.max(initial=0))
    if int(lab.min(initial=0)) < 0 or top > 65535:
        raise ValueError(f"class indices must lie in 0..65535 for a PNG label map, got {lab.min()}..{top}")
    h, w = lab.shape
    if top > 255:
        img = Image.frombytes("I;16", (w, h), np.ascontiguousarray(lab, dtype="<u2").tobytes())
    else:
        img = Image.frombytes("P", (w, h), np.ascontiguousarray(lab, dtype=np.uint8).tobytes())
        pal = np.zeros((256, 3), np.uint8)
        pal[: top + 1] = palette(top + 1)
        img.putpalette(pal.flatten().tolist())
    img.save(path, format="PNG")
