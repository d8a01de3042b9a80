"""Image loading, the mmcv short-side resize rule and CLIP / VFM normalisation.

The reference pipeline (protocol.md §6) decodes with OpenCV (EXIF-rotated, BGR uint8), resizes with
``cv2.resize(..., INTER_LINEAR)`` on uint8, flips to RGB and applies ``(x - mean) / std`` with CLIP's statistics on
the 0–255 scale. This module restates those steps with PIL + torch only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

# the normalisations live with the models they serve; re-exported here for the pipeline's users
from cass_plugins.backbone.normalization import (
    CLIP_MEAN_255, CLIP_STD_255, IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_normalize,
    to_vfm_normalization,
)

__all__ = [
    "CLIP_MEAN_255",
    "CLIP_STD_255",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageSource",
    "load_image",
    "rescaled_size",
    "resize_short_side",
    "clip_normalize",
    "to_vfm_normalization",
]

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]

_ACCEPTED = (
    "a path (str / os.PathLike), a PIL image, a numpy array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) "
    "with dtype uint8, uint16, bool or float in [0, 1], or a channels-first torch tensor of shape (H, W), (1, H, W), "
    "(3, H, W) or (4, H, W) with the same dtypes"
)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_UINT16_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def load_image(source: ImageSource) -> torch.Tensor:
    """Load an image as an RGB ``uint8`` tensor of shape ``(3, H, W)`` on the CPU.

    Conversions (every input kind goes through the same rules):

    * Files are decoded with PIL and EXIF-transposed (the reference decoder, OpenCV with ``IMREAD_COLOR``, applies the
      EXIF orientation too). Palette, CMYK, YCbCr, LAB, HSV and 1-bit images are converted with PIL's ``convert``.
    * Grayscale is repeated to 3 channels.
    * Alpha is composited onto **white**: ``rgb·α + 255·(1 − α)``. Dropping alpha would expose whatever colour
      the encoder left under transparent pixels (often black or garbage); white is what a viewer shows.
      OpenCV's ``IMREAD_COLOR`` simply drops alpha, so fully opaque images are identical either way.
    * 16-bit data is scaled to 8 bits, ``round_half_up(x / 257)`` (65535 → 255), not clipped. PIL's 32-bit ``I`` mode
      (how some Pillow versions open 16-bit PNGs) is treated as 16-bit and must lie in [0, 65535].
    * Floats (numpy, torch, PIL ``F``) must lie in [0, 1] and become ``round_half_up(x · 255)``; bools become 0 / 255.

    Args:
        source: a path, a PIL image, a numpy array (channels-last) or a torch tensor (channels-first).

    Returns:
        Contiguous ``torch.uint8`` tensor ``(3, H, W)``, RGB.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not an image PIL can read, or the array has an unsupported shape / value range.
        TypeError: the source or its dtype is not one of the accepted kinds.
    """
    if isinstance(source, (str, os.PathLike)):
        array = _read_file(Path(source))
    elif isinstance(source, Image.Image):
        array = _pil_to_array(source)
    elif isinstance(source, np.ndarray):
        array = source
    elif isinstance(source, torch.Tensor):
        array = _tensor_to_hwc(source)
    else:
        raise TypeError(f"load_image got {type(source).__name__}; it accepts {_ACCEPTED}.")
    hwc = _to_uint8_rgb(array)
    return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))


def _read_file(path: Path) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"Image file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not an image file.")
    try:
        with Image.open(path) as img:
            # load() forces the full decode, so truncated files fail here rather than later.
            img.load()
            return _pil_to_array(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        # PIL raises OSError for truncated data and SyntaxError from some plugins on malformed headers.
        raise ValueError(f"{path} is not an image PIL can read ({type(err).__name__}: {err}).") from err


def _pil_to_array(img: Image.Image) -> np.ndarray:
    # exif_transpose before any convert(): convert() may not carry the EXIF block along in every Pillow version.
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode in ("RGB", "L"):
        return np.asarray(img)
    if mode in _UINT16_MODES:
        return np.asarray(img).astype(np.uint16)
    if mode == "I":
        data = np.asarray(img)
        if data.size and (data.min() < 0 or data.max() > 65535):
            raise ValueError(
                f"32-bit integer image with values in [{data.min()}, {data.max()}]; only 16-bit data "
                "(values in [0, 65535]) is supported for PIL mode 'I'."
            )
        return data.astype(np.uint16)
    if mode == "F":
        return np.asarray(img)
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        return np.asarray(img.convert("RGBA"))
    # P without transparency, 1, CMYK, YCbCr, LAB, HSV: PIL knows the colour conversion.
    try:
        return np.asarray(img.convert("RGB"))
    except (ValueError, OSError) as err:
        raise ValueError(f"PIL cannot convert an image of mode {mode!r} to RGB ({err}).") from err


def _tensor_to_hwc(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dim() == 2:
        return t.numpy()
    if t.dim() == 3 and t.shape[0] in (1, 3, 4):
        return t.permute(1, 2, 0).numpy()
    hint = ""
    if t.dim() == 3 and t.shape[-1] in (1, 3, 4):
        hint = " It looks channels-last; pass tensor.permute(2, 0, 1) (tensors must be channels-first)."
    raise ValueError(f"Unsupported tensor shape {tuple(t.shape)}; load_image accepts {_ACCEPTED}.{hint}")


def _to_uint8_rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"Unsupported image array shape {a.shape}; load_image accepts {_ACCEPTED}.")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"Empty image of shape {a.shape}.")
    # Everything becomes float64 in [0, 255] first so that the alpha composite and 16-bit scaling round once.
    if a.dtype == np.uint8:
        f = a.astype(np.float64)
    elif a.dtype == np.uint16:
        f = a.astype(np.float64) / 257.0
    elif a.dtype == np.bool_:
        f = a.astype(np.float64) * 255.0
    elif np.issubdtype(a.dtype, np.floating):
        f = a.astype(np.float64)
        if not np.isfinite(f).all():
            raise ValueError("Float image contains NaN or inf.")
        lo, hi = float(f.min()), float(f.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"Float images must lie in [0, 1], got values in [{lo:g}, {hi:g}]; pass uint8 for 0–255 data."
            )
        f = f * 255.0
    else:
        raise TypeError(f"Unsupported image dtype {a.dtype}; load_image accepts {_ACCEPTED}.")
    channels = f.shape[2]
    if channels == 4:
        alpha = f[:, :, 3:4] / 255.0
        f = f[:, :, :3] * alpha + 255.0 * (1.0 - alpha)
    elif channels == 1:
        f = np.repeat(f, 3, axis=2)
    # Round half up (as OpenCV's saturate_cast does for positive values); clip only guards float error at 255.
    return np.clip(np.floor(f + 0.5), 0, 255).astype(np.uint8)


def rescaled_size(h: int, w: int, short_side: int, max_long: int = 2048) -> tuple[int, int]:
    """Output size of mmcv's ``Resize(scale=(max_long, short_side), keep_ratio=True)``.

    ``s = min(max_long / max(h, w), short_side / min(h, w))`` and each side becomes ``int(side · s + 0.5)``
    (round half up). The short side becomes ``short_side`` unless that would push the long side past ``max_long``.
    Images may be up- or down-scaled.

    Args:
        h: input height.
        w: input width.
        short_side: target short side ``S``.
        max_long: cap on the long side.

    Returns:
        ``(new_h, new_w)``.
    """
    for name, value in (("h", h), ("w", w), ("short_side", short_side), ("max_long", max_long)):
        if int(value) != value or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if short_side > max_long:
        # mmcv would silently swap the roles of the two numbers; that is never intended.
        raise ValueError(f"short_side ({short_side}) must not exceed max_long ({max_long}).")
    scale = min(max_long / max(h, w), short_side / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_short_side(img: torch.Tensor, short_side: int, max_long: int = 2048) -> torch.Tensor:
    """Resize ``(3, H, W)`` or ``(B, 3, H, W)`` images with the mmcv rule (see :func:`rescaled_size`).

    Resampling is bilinear with half-pixel centres (``align_corners=False``) and no antialiasing, as
    ``cv2.INTER_LINEAR``. Deviation: OpenCV interpolates uint8 with 11-bit fixed-point weights, so results can differ
    from it by about one grey level on some pixels.

    The output dtype follows the input: ``uint8`` in → ``uint8`` out, rounded half up like OpenCV's output (the
    reference normalises that rounded image); floating in → same float dtype, unrounded, still on the 0–255 scale.

    Args:
        img: image tensor, channels-first.
        short_side: target short side ``S``.
        max_long: cap on the long side.

    Returns:
        The resized tensor (the input itself when the size does not change).
    """
    if img.dim() not in (3, 4):
        raise ValueError(f"resize_short_side expects (C, H, W) or (B, C, H, W), got shape {tuple(img.shape)}.")
    h, w = img.shape[-2:]
    new_h, new_w = rescaled_size(h, w, short_side, max_long)
    if (new_h, new_w) == (h, w):
        return img
    batched = img if img.dim() == 4 else img.unsqueeze(0)
    src = batched if batched.is_floating_point() else batched.float()
    out = F.interpolate(src, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False)
    if not img.is_floating_point():
        out = torch.floor(out + 0.5).clamp_(0, 255).to(img.dtype)
    return out if img.dim() == 4 else out.squeeze(0)
