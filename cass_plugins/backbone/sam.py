"""SAM image encoders for Trident: the input geometry, loading, and the capture of the last block's attention and values.

Trident (docs/spec/trident.md) aggregates the spliced CLIP features with an affinity built from the **last** block of
SAM's image encoder: its post-softmax per-head attention (decomposed rel-pos included) and its per-head values, both
cropped to the valid token grid (§5.2). This module gives that capture for two backends:

* ``"segment_anything"`` (Meta's package, extra ``cass_plugins[sam]``): the whole :class:`Sam` (encoder, prompt
  encoder, mask decoder). The encoder runs through ``SamPredictor.set_image``, so the predictor keeps the image
  features and one encoder pass serves both the aggregation and the prompt refinement (§10, recommendation).
* ``"timm"`` (``VisionTransformerSAM``, no extra dependency): the encoder only, for the aggregation; refinement is
  refused (:attr:`SamBackbone.can_refine`).

The capture is one forward hook on ``blocks[-1].attn`` that stores its input ``norm1(x)`` (B×H×W×C); the attention
is then **recomputed** (§10 "capture recipe"): timm runs fused SDPA, so the matrix is never materialised there. The
recomputation runs in float32 whatever the encoder's dtype (§12 answer 17) and never holds the full
``(heads, 4096, 4096)`` tensor (805 MB for ViT-B in fp32, §10): :meth:`SamAttention.head` builds one head at a time.

Precision: ``fp16``/``bf16`` cast the image encoder (and SAM's pixel mean/std, as the official ``sam.half()`` does,
so the normalisation runs in that dtype too); the prompt encoder and mask decoder stay float32 and the predictor's
features are cast to float32 after ``set_image`` (§8 "Inputs", §12 answer 17). SAM ViT-H in ``fp16`` is **refused**
(T-Q12: segment-anything#540 reports garbage in fp16; the fp32-LayerNorm workaround of #696 cannot be verified
here): use ``fp32`` (the spec's recommendation, §12 answer 18) or ``bf16`` (float32's exponent range, so no overflow).

Config and checkpoint facts: ``segment_anything/build_sam.py:14-106`` (Meta) and
``timm/models/vision_transformer_sam.py:677-783`` (timm 1.0.31), summarised in §9 and §10.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cass_plugins.backbone import loading as _loading
from cass_plugins.backbone.loading import CheckpointError, WeightsUnavailableError, read_checkpoint

log = logging.getLogger(__name__)

__all__ = [
    "SAM_CONFIGS",
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
    "SAM_BACKENDS",
    "SamAttention",
    "SamBackbone",
    "SamEncoding",
    "SamGeometry",
    "build_sam",
    "load_sam",
    "round_up_image",
    "sam_input_geometry",
    "sam_preprocess",
]

_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

#: SAM architectures as data (``build_sam.py:14-44, 55-100``; timm ``samvit_*_patch16``). ``test`` is the tiny
#: random-weight configuration of spec §14 (grid 16×16, low-res mask 4·16 = 64); it has no pretrained weights.
SAM_CONFIGS: dict[str, dict[str, Any]] = {
    "vit_b": dict(
        embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11), window_size=14, img_size=1024,
        patch_size=16, prompt_embed_dim=256, mask_in_chans=16, decoder_depth=2, decoder_mlp_dim=2048,
        decoder_heads=8, iou_head_hidden_dim=256, title="SAM ViT-B",
        checkpoint="sam_vit_b_01ec64.pth", url=_URL + "sam_vit_b_01ec64.pth", timm_name="samvit_base_patch16",
    ),
    "vit_l": dict(
        embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23), window_size=14, img_size=1024,
        patch_size=16, prompt_embed_dim=256, mask_in_chans=16, decoder_depth=2, decoder_mlp_dim=2048,
        decoder_heads=8, iou_head_hidden_dim=256, title="SAM ViT-L",
        checkpoint="sam_vit_l_0b3195.pth", url=_URL + "sam_vit_l_0b3195.pth", timm_name="samvit_large_patch16",
    ),
    "vit_h": dict(
        embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31), window_size=14, img_size=1024,
        patch_size=16, prompt_embed_dim=256, mask_in_chans=16, decoder_depth=2, decoder_mlp_dim=2048,
        decoder_heads=8, iou_head_hidden_dim=256, title="SAM ViT-H",
        checkpoint="sam_vit_h_4b8939.pth", url=_URL + "sam_vit_h_4b8939.pth", timm_name="samvit_huge_patch16",
    ),
    "test": dict(
        embed_dim=64, depth=2, num_heads=4, global_attn_indexes=(1,), window_size=4, img_size=256,
        patch_size=16, prompt_embed_dim=32, mask_in_chans=16, decoder_depth=2, decoder_mlp_dim=64,
        decoder_heads=2, iou_head_hidden_dim=32, title="tiny test SAM",
        checkpoint=None, url=None, timm_name=None,
    ),
}

SAM_BACKENDS = ("segment_anything", "timm")
#: SAM's pixel statistics on the 0-255 scale (ImageNet × 255; ``build_sam.py:99-100``).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_EXTRA_HINT = (
    'pip install "cass_plugins[sam]" (or pip install segment-anything); backend="timm" runs the SAM aggregation '
    "without it, but not the prompt refinement"
)


# ------------------------------------------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class SamGeometry:
    """Sizes of Trident's SAM input for one image (spec §5.1); all sizes are ``(height, width)``.

    Attributes:
        rounded_size: the original image with each side rounded up to a multiple of ``round_to`` (§5.1 step 2).
        part_sizes: the image(s) SAM encodes: the rounded image, or its left and right halves split at ``w // 2``.
        input_sizes: each part after ResizeLongestSide(img_size), before zero-padding to ``img_size²`` (step 3).
        grids: each part's valid token grid ``(input_h // patch, input_w // patch)`` (floors, step 4).
    """

    rounded_size: tuple[int, int]
    part_sizes: tuple[tuple[int, int], ...]
    input_sizes: tuple[tuple[int, int], ...]
    grids: tuple[tuple[int, int], ...]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _longest_side_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """``ResizeLongestSide.get_preprocess_shape`` (``utils/transforms.py:93-102``): ``int(side·scale + 0.5)``."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def sam_input_geometry(
    height: int, width: int, *, round_to: int, img_size: int = 1024, patch: int = 16, split_halves: bool = False,
) -> SamGeometry:
    """Trident's SAM input arithmetic (spec §5.1 steps 2-5; ``trident.py:112-154``).

    Args:
        height: original image height.
        width: original image width.
        round_to: the CLIP patch size ``p``; each side is rounded **up** to a multiple of it (T-Q5).
        img_size: SAM's square input side (1024 for Meta's models).
        patch: SAM's patch size.
        split_halves: Cityscapes mode (§5.1 step 5, T-Q8): two parts, the left and right halves at ``w // 2``.

    Returns:
        A :class:`SamGeometry`. Example: VOC 375×500 (H×W) with ``round_to=16`` → rounded 384×512, input 768×1024,
        grid 48×64.
    """
    h, w = _positive_int("height", height), _positive_int("width", width)
    p = _positive_int("round_to", round_to)
    img_size, patch = _positive_int("img_size", img_size), _positive_int("patch", patch)
    rounded = (-(-h // p) * p, -(-w // p) * p)
    rh, rw = rounded
    if split_halves:
        if rw < 2:
            raise ValueError(f"split_halves needs an image at least 2 pixels wide, got width {width}")
        parts = ((rh, rw // 2), (rh, rw - rw // 2))
    else:
        parts = (rounded,)
    inputs = tuple(_longest_side_shape(ph, pw, img_size) for ph, pw in parts)
    grids = tuple((ih // patch, iw // patch) for ih, iw in inputs)
    if any(min(g) == 0 for g in grids):
        raise ValueError(
            f"image {height}×{width} (H×W) is too elongated for SAM: its short side resizes to fewer than {patch} "
            f"pixels, so the valid SAM grid {grids} is empty; crop or pad the image first")
    return SamGeometry(rounded, parts, inputs, grids)


def round_up_image(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Resize a ``(3, H, W)`` uint8 image so each side is the next multiple of ``multiple`` (spec §5.1 step 2).

    Restates ``cv2.resize(img, (W', H'), interpolation=cv2.INTER_LINEAR)`` on uint8 (T-Q5) the way
    :func:`cass_plugins.pipeline.image.resize_short_side` does: bilinear with half-pixel centres, no antialias,
    rounded half up to uint8 (OpenCV's 11-bit fixed-point weights can differ by one grey level on some pixels).

    Returns:
        The resized uint8 image, or ``image`` itself when both sides are already multiples.
    """
    m = _positive_int("round_to", multiple)
    h, w = image.shape[-2:]
    size = (-(-h // m) * m, -(-w // m) * m)
    if size == (h, w):
        return image
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=False)
    return torch.floor(out[0] + 0.5).clamp_(0, 255).to(torch.uint8)


def _resize_longest_side(image_hwc: np.ndarray, img_size: int) -> np.ndarray:
    """``ResizeLongestSide.apply_image``: torchvision ``resize`` of a PIL image (PIL bilinear, antialiased)."""
    from torchvision.transforms.functional import resize, to_pil_image

    size = _longest_side_shape(image_hwc.shape[0], image_hwc.shape[1], img_size)
    return np.array(resize(to_pil_image(image_hwc), list(size)))


def sam_preprocess(
    image_hwc: np.ndarray, img_size: int, *, dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """What ``SamPredictor.set_image`` feeds the encoder (``predictor.py:34-90``, ``sam.py:164-174``; §5.1 step 3).

    ResizeLongestSide(img_size) with PIL bilinear, ``(x − mean) / std`` with SAM's statistics in ``dtype`` (the
    official model is ``.half()``-ed, its buffers included), zero-padding at the bottom and right to ``img_size²``.

    Args:
        image_hwc: RGB uint8 ``(H, W, 3)``.
        img_size: SAM's input side.
        dtype: the encoder's dtype.
        device: where the tensor goes.

    Returns:
        ``(1, 3, img_size, img_size)`` encoder input and the resized size ``(h, w)`` before padding.
    """
    resized = _resize_longest_side(image_hwc, img_size)
    x = torch.as_tensor(resized, device=device).permute(2, 0, 1).contiguous()[None]
    mean = torch.tensor(SAM_PIXEL_MEAN, device=device).view(-1, 1, 1).to(dtype)
    std = torch.tensor(SAM_PIXEL_STD, device=device).view(-1, 1, 1).to(dtype)
    x = (x - mean) / std
    h, w = x.shape[-2:]
    return F.pad(x, (0, img_size - w, 0, img_size - h)), (int(h), int(w))


# ------------------------------------------------------------------------------------------------------ capture
@dataclass
class SamAttention:
    """The last SAM block's attention and values for one encoded part, cropped to the valid grid (spec §5.2).

    Holds q, k, v and the decomposed rel-pos terms of the full ``img_size/16`` grid in float32; the
    ``(M, M)`` attention of a head is built on demand by :meth:`head`, so the ``(heads, 4096, 4096)`` tensor never
    exists (§10). Token order is row-major over the grid everywhere.

    Attributes:
        num_heads: SAM's head count ``h_s`` (12 for ViT-B).
        grid: valid grid ``(h', w')``; ``M = h'·w'``.
        full_grid: the encoder's token grid (64×64 for Meta's models); softmax runs over all of it.
        input_size: the part's resized size before padding.
    """

    num_heads: int
    grid: tuple[int, int]
    full_grid: tuple[int, int]
    input_size: tuple[int, int]
    scale: float
    q: torch.Tensor = field(repr=False)
    k: torch.Tensor = field(repr=False)
    v: torch.Tensor = field(repr=False)
    rel_h: torch.Tensor | None = field(repr=False, default=None)
    rel_w: torch.Tensor | None = field(repr=False, default=None)

    @property
    def head_dim(self) -> int:
        return int(self.v.shape[-1])

    @property
    def num_tokens(self) -> int:
        """``M = h'·w'``."""
        return self.grid[0] * self.grid[1]

    @property
    def values(self) -> torch.Tensor:
        """``(heads, M, head_dim)`` float32 values (qkv projection of ``norm1(x)``), valid grid, row-major."""
        gh, gw = self.full_grid
        h, w = self.grid
        return self.v.view(self.num_heads, gh, gw, -1)[:, :h, :w].reshape(self.num_heads, h * w, -1)

    def head(self, h: int) -> torch.Tensor:
        """Post-softmax attention of head ``h`` cropped to the valid grid on queries **and** keys: ``(M, M)`` float32.

        ``softmax_j(q_i·d^-0.5·k_j + rel_h[i, row(j)] + rel_w[i, col(j)])`` over **all** grid tokens (padding
        included, as SAM computes it), then cropped; the rows therefore no longer sum to 1 when there is padding
        (§5.2, renormalised by the affinity, §5.3 step 5).
        """
        if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or not 0 <= h < self.num_heads:
            raise IndexError(f"head index must be an integer in [0, {self.num_heads}), got {h!r}")
        gh, gw = self.full_grid
        rows, cols = self.grid
        # each row's softmax runs over all keys, so padding queries can be dropped first (their rows are cropped)
        q = self.q[h].view(gh, gw, -1)[:rows, :cols].reshape(rows * cols, -1)
        logits = ((q * self.scale) @ self.k[h].transpose(0, 1)).view(rows, cols, gh, gw)
        if self.rel_h is not None:
            logits.add_(self.rel_h[h][:rows, :cols, :, None]).add_(self.rel_w[h][:rows, :cols, None, :])
        attn = logits.view(rows * cols, gh * gw).softmax(dim=-1)
        return attn.view(rows, cols, gh, gw)[:, :, :rows, :cols].reshape(rows * cols, rows * cols)

    def attention(self) -> torch.Tensor:
        """All heads, ``(heads, M, M)`` float32. For small grids and tests: ViT-B at 64×64 needs 805 MB (§10)."""
        return torch.stack([self.head(h) for h in range(self.num_heads)])


def _decomposed_rel_pos(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, grid: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two rel-pos terms of ``add_decomposed_rel_pos`` (``image_encoder.py:296-365``) for q and k on one grid.

    With equal query and key sizes, ``R[i, j] = rel_pos[i − j + size − 1]``; then
    ``rel_h[y, x, ky] = q[y, x]·Rh[y, ky]`` and ``rel_w[y, x, kx] = q[y, x]·Rw[x, kx]``.

    Args:
        q: ``(heads, gh·gw, d)`` unscaled queries.

    Returns:
        ``(heads, gh, gw, gh)`` and ``(heads, gh, gw, gw)``.
    """
    gh, gw = grid
    for name, table, size in (("rel_pos_h", rel_pos_h, gh), ("rel_pos_w", rel_pos_w, gw)):
        if table.shape[0] != 2 * size - 1:
            raise ValueError(
                f"the last SAM block's {name} has {table.shape[0]} entries, but its {size}-token axis needs "
                f"{2 * size - 1}; the encoder input must be img_size×img_size (SAM pads every image to it)")
    idx_h = torch.arange(gh, device=q.device)[:, None] - torch.arange(gh, device=q.device)[None, :] + gh - 1
    idx_w = torch.arange(gw, device=q.device)[:, None] - torch.arange(gw, device=q.device)[None, :] + gw - 1
    rh, rw = rel_pos_h.float()[idx_h], rel_pos_w.float()[idx_w]
    r_q = q.reshape(q.shape[0], gh, gw, -1)
    return torch.einsum("nhwc,hkc->nhwk", r_q, rh), torch.einsum("nhwc,wkc->nhwk", r_q, rw)


def _check_capturable(attn: nn.Module, block: nn.Module) -> None:
    if getattr(block, "window_size", 0) != 0:
        raise ValueError(
            "the last block of this SAM encoder uses windowed attention; Trident needs a global last block "
            "(Meta's and timm's SAM configs all end with one, spec §5.2)")
    q_norm = getattr(attn, "q_norm", None)
    if (q_norm is not None and not isinstance(q_norm, nn.Identity)) or getattr(attn, "rope", None) is not None:
        raise ValueError("the last SAM block uses q/k-norm or RoPE, which the attention recomputation does not model")


def _attention_from_input(
    attn: nn.Module, x: torch.Tensor, grid: tuple[int, int], input_size: tuple[int, int],
) -> SamAttention:
    """Recompute the last block's q, k, v (+ rel-pos terms) in float32 from its hooked input ``x`` (1×H×W×C)."""
    if x.shape[0] != 1:
        raise ValueError(f"expected one image per encoder pass, got a batch of {x.shape[0]}")
    gh, gw = int(x.shape[1]), int(x.shape[2])
    heads = int(attn.num_heads)
    weight = attn.qkv.weight.float()
    bias = None if attn.qkv.bias is None else attn.qkv.bias.float()
    qkv = F.linear(x.reshape(gh * gw, -1).float(), weight, bias)
    # (N, 3·C) → 3 × (heads, N, d): the layout of both backends' reshape(B, N, 3, heads, -1)
    q, k, v = qkv.view(gh * gw, 3, heads, -1).permute(1, 2, 0, 3).unbind(0)
    rel_h = rel_w = None
    if getattr(attn, "use_rel_pos", False):
        rel_h, rel_w = _decomposed_rel_pos(q, attn.rel_pos_h, attn.rel_pos_w, (gh, gw))
    return SamAttention(
        num_heads=heads, grid=grid, full_grid=(gh, gw), input_size=input_size, scale=float(attn.scale),
        q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), rel_h=rel_h, rel_w=rel_w,
    )


@dataclass
class SamEncoding:
    """SAM's view of one image (spec §5.1-§5.2).

    Attributes:
        parts: one :class:`SamAttention` per encoded part: one, or two (left half, then right) with
            ``split_halves`` (§5.1 step 5).
        rounded_size: ``(H, W)`` of the image after rounding each side up to ``round_to``.
        original_size: ``(H, W)`` of the image given to :meth:`SamBackbone.encode`.
        predictor: a ``segment_anything.SamPredictor`` holding the **rounded** full image (T-Q14) and its
            float32 features, for the prompt refinement; ``None`` for timm or without ``keep_for_refine``.
    """

    parts: list[SamAttention]
    rounded_size: tuple[int, int]
    original_size: tuple[int, int]
    predictor: Any = None


# ------------------------------------------------------------------------------------------------------ backbone
def _require_segment_anything() -> Any:
    """Import ``segment_anything`` or say how to get it."""
    try:
        import segment_anything
        import segment_anything.modeling
    except ImportError as err:
        raise ImportError(f"the SAM backend 'segment_anything' needs the segment-anything package: {_EXTRA_HINT}") from err
    return segment_anything


def _is_segment_anything_sam(model: nn.Module) -> bool:
    return type(model).__module__.startswith("segment_anything") and hasattr(model, "image_encoder")


def _kind_of(embed_dim: int, depth: int) -> str | None:
    for kind, cfg in SAM_CONFIGS.items():
        if (cfg["embed_dim"], cfg["depth"]) == (embed_dim, depth):
            return kind
    return None


class SamBackbone:
    """A SAM image encoder (segment_anything ``Sam`` or timm ``VisionTransformerSAM``) that captures Trident's
    last-block attention and values (spec §5).

    Attributes:
        kind: ``"vit_b"``, ``"vit_l"``, ``"vit_h"``, ``"test"`` or ``"custom"``.
        backend: ``"segment_anything"`` or ``"timm"``.
        model: the ``Sam`` (segment_anything) or the timm encoder.
        encoder: the image encoder inside ``model``.
        patch_size, img_size, num_heads, head_dim: the encoder's geometry.
        can_refine: whether :meth:`encode` can keep a predictor for the prompt refinement (segment_anything only).
        device, dtype: of the image encoder.
    """

    def __init__(self, model: nn.Module, *, kind: str | None = None) -> None:
        """Wrap a built SAM.

        Args:
            model: a ``segment_anything.modeling.Sam`` or a timm ``VisionTransformerSAM``.
            kind: its :data:`SAM_CONFIGS` name; detected from the width and depth when omitted.
        """
        if _is_segment_anything_sam(model):
            self.backend, encoder = "segment_anything", model.image_encoder
            img_size = int(encoder.img_size)
        elif type(model).__name__ == "VisionTransformerSAM":
            self.backend, encoder = "timm", model
            img_size = int(encoder.patch_embed.img_size[0])
        else:
            raise TypeError(
                f"SamBackbone wraps a segment_anything Sam or a timm VisionTransformerSAM, got {type(model).__name__}; "
                "use load_sam(...)")
        self.model, self.encoder = model, encoder
        proj = encoder.patch_embed.proj
        self.patch_size = int(proj.kernel_size[0])
        self.img_size = img_size
        last = encoder.blocks[-1]
        self.num_heads = int(last.attn.num_heads)
        self.head_dim = int(proj.out_channels) // self.num_heads
        detected = _kind_of(int(proj.out_channels), len(encoder.blocks))
        self.kind = kind or detected or "custom"
        self.can_refine = self.backend == "segment_anything"
        _check_capturable(last.attn, last)

    @property
    def device(self) -> torch.device:
        return self.encoder.patch_embed.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.patch_embed.proj.weight.dtype

    def __repr__(self) -> str:
        return (f"SamBackbone(kind={self.kind!r}, backend={self.backend!r}, dtype={self.dtype}, "
                f"device={self.device})")

    # ---------------------------------------------------------------------------------------------- encode
    def encode(
        self, image: torch.Tensor | np.ndarray, *, round_to: int, split_halves: bool = False,
        keep_for_refine: bool = False,
    ) -> SamEncoding:
        """Encode the ORIGINAL image as Trident does and capture the last block (spec §5.1, §5.2).

        Steps: round each side up to a multiple of ``round_to`` (cv2-linear equivalent, T-Q5); per part (the
        rounded image, or its halves at ``w // 2`` with ``split_halves``, T-Q8) ResizeLongestSide(img_size),
        SAM normalisation, zero-padding, the encoder in its dtype, and the capture of ``blocks[-1].attn``.

        Args:
            image: RGB uint8, ``(3, H, W)`` torch tensor or ``(H, W, 3)`` numpy array
                (:func:`cass_plugins.pipeline.image.load_image` gives the former).
            round_to: the CLIP patch size ``p`` (16, or 14 for H/14).
            split_halves: Cityscapes mode: encode the left and right halves separately (two parts).
            keep_for_refine: return the ``SamPredictor`` holding the full rounded image (with ``split_halves``
                a third encoder pass sets it); segment_anything only.

        Returns:
            A :class:`SamEncoding`.
        """
        if keep_for_refine and not self.can_refine:
            raise ValueError(
                f"the SAM prompt refinement needs SAM's prompt encoder and mask decoder, which the {self.backend} "
                f"backend does not have: load_sam(..., backend=\"segment_anything\") ({_EXTRA_HINT}), or switch the "
                "refinement off")
        chw = _as_chw_uint8(image)
        geometry = sam_input_geometry(
            int(chw.shape[1]), int(chw.shape[2]), round_to=round_to, img_size=self.img_size,
            patch=self.patch_size, split_halves=split_halves)
        rounded = round_up_image(chw, round_to)
        hwc = np.ascontiguousarray(rounded.permute(1, 2, 0).cpu().numpy())
        if split_halves:
            half = hwc.shape[1] // 2
            images = [hwc[:, :half], hwc[:, half:]]
        else:
            images = [hwc]
        parts, predictor = [], None
        for part, grid, size in zip(images, geometry.grids, geometry.input_sizes):
            attention, predictor = self._encode_part(np.ascontiguousarray(part), grid)
            if attention.input_size != size:  # the predictor's resize and §5.1's arithmetic must agree
                raise RuntimeError(f"SAM input {attention.input_size} differs from the expected {size}")
            parts.append(attention)
        if keep_for_refine:
            if split_halves:  # the predictor must hold the full image for the prompts (§5.1 step 5)
                predictor = self._set_image(hwc)
        else:
            predictor = None
        return SamEncoding(parts, geometry.rounded_size, (int(chw.shape[1]), int(chw.shape[2])), predictor)

    def _set_image(self, hwc: np.ndarray) -> Any:
        from segment_anything import SamPredictor

        predictor = SamPredictor(self.model)
        predictor.set_image(hwc, image_format="RGB")
        if predictor.features.dtype != torch.float32:
            # the official refinement casts the features for its float32 decoder (trident.py:133, §8 "Inputs")
            predictor.features = predictor.features.float()
        return predictor

    @torch.no_grad()
    def _encode_part(self, hwc: np.ndarray, grid: tuple[int, int]) -> tuple[SamAttention, Any]:
        """One encoder pass with the capture hook; the hook is removed even when the pass fails."""
        block = self.encoder.blocks[-1]
        captured: list[torch.Tensor] = []

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            captured.append(args[0].detach())

        handle = block.attn.register_forward_hook(hook)
        predictor = None
        try:
            if self.backend == "segment_anything":
                predictor = self._set_image(hwc)
                input_size = tuple(int(s) for s in predictor.input_size)
            else:
                x, input_size = sam_preprocess(hwc, self.img_size, dtype=self.dtype, device=self.device)
                self.encoder.forward_features(x)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"the SAM encoder called its last attention {len(captured)} times in one pass, expected 1")
        return _attention_from_input(block.attn, captured[0], grid, input_size), predictor


def _as_chw_uint8(image: Any) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"a numpy image must be RGB (H, W, 3), got shape {image.shape}; "
                             "cass_plugins.pipeline.image.load_image converts other layouts")
        if image.dtype != np.uint8:
            raise TypeError(f"the image must be uint8 0-255, got {image.dtype}; use load_image to convert it")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"a tensor image must be RGB channels-first (3, H, W), got shape {tuple(image.shape)}; "
                             "cass_plugins.pipeline.image.load_image converts other layouts")
        if image.dtype != torch.uint8:
            raise TypeError(f"the image must be uint8 0-255, got {image.dtype}; use load_image to convert it")
        return image.detach().cpu()
    raise TypeError(f"image must be a (3, H, W) uint8 tensor or an (H, W, 3) uint8 numpy array, got {type(image).__name__}")


# ------------------------------------------------------------------------------------------------------ building
def _check_kind(kind: str) -> dict[str, Any]:
    if kind not in SAM_CONFIGS:
        raise ValueError(f"unknown SAM kind {kind!r}; use one of {sorted(SAM_CONFIGS)} (--sam vit_b|vit_l|vit_h)")
    return SAM_CONFIGS[kind]


def _check_backend(backend: str) -> None:
    if backend not in SAM_BACKENDS:
        raise ValueError(f"unknown SAM backend {backend!r}; use one of {list(SAM_BACKENDS)}")


def _timm_kwargs() -> dict[str, Any]:
    # Meta's LayerNorms use eps 1e-6 (build_sam.py:72); timm's samvit_* default to nn.LayerNorm's 1e-5
    return dict(num_classes=0, norm_layer=partial(nn.LayerNorm, eps=1e-6))


def _build_timm(kind: str, pretrained: bool = False) -> nn.Module:
    import timm

    cfg = SAM_CONFIGS[kind]
    if cfg["timm_name"] is not None:
        name = cfg["timm_name"] + (".sa1b" if pretrained else "")
        return timm.create_model(name, pretrained=pretrained, **_timm_kwargs())
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    return VisionTransformerSAM(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"], depth=cfg["depth"],
        num_heads=cfg["num_heads"], global_attn_indexes=cfg["global_attn_indexes"], window_size=cfg["window_size"],
        use_rel_pos=True, neck_chans=cfg["prompt_embed_dim"], **_timm_kwargs())


def build_sam(kind: str, backend: str = "segment_anything") -> nn.Module:
    """A random-weight SAM of a :data:`SAM_CONFIGS` kind (``build_sam.py:55-100`` as data; spec §14 for ``test``).

    Args:
        kind: ``"vit_b"``, ``"vit_l"``, ``"vit_h"`` or ``"test"``.
        backend: ``"segment_anything"`` (whole ``Sam``) or ``"timm"`` (``VisionTransformerSAM`` encoder).

    Returns:
        The model in eval mode, float32, on the CPU.
    """
    cfg = _check_kind(kind)
    _check_backend(backend)
    if backend == "timm":
        return _build_timm(kind).eval()
    _require_segment_anything()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = cfg["img_size"] // cfg["patch_size"]
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg["depth"], embed_dim=cfg["embed_dim"], img_size=cfg["img_size"], mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=cfg["num_heads"], patch_size=cfg["patch_size"],
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=cfg["global_attn_indexes"],
            window_size=cfg["window_size"], out_chans=cfg["prompt_embed_dim"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg["prompt_embed_dim"], image_embedding_size=(grid, grid),
            input_image_size=(cfg["img_size"], cfg["img_size"]), mask_in_chans=cfg["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=cfg["decoder_depth"], embedding_dim=cfg["prompt_embed_dim"], mlp_dim=cfg["decoder_mlp_dim"],
                num_heads=cfg["decoder_heads"],
            ),
            transformer_dim=cfg["prompt_embed_dim"], iou_head_depth=3, iou_head_hidden_dim=cfg["iou_head_hidden_dim"],
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )
    return sam.eval()


# ------------------------------------------------------------------------------------------------------ checkpoints
def _is_meta_sam(state: Mapping[str, Any]) -> bool:
    return "image_encoder.patch_embed.proj.weight" in state


def _is_timm_sam(state: Mapping[str, Any]) -> bool:
    return "patch_embed.proj.weight" in state and (
        "neck.0.weight" in state or any(k.endswith("attn.rel_pos_h") for k in state))


def _sam_arch(state: Mapping[str, Any], prefix: str) -> tuple[int, int]:
    """``(embed_dim, depth)`` of a SAM encoder state dict whose encoder keys start with ``prefix``."""
    width = int(state[prefix + "patch_embed.proj.weight"].shape[0])
    blocks = prefix + "blocks."
    depth = len({k[len(blocks):].split(".")[0] for k in state if k.startswith(blocks)})
    return width, depth


def _describe_sam(width: int, depth: int) -> str:
    found = _kind_of(width, depth)
    if found is None:
        return f"a SAM encoder of width {width} and depth {depth}, which matches no known SAM ({sorted(SAM_CONFIGS)})"
    return f"a {SAM_CONFIGS[found]['title']} checkpoint (width {width}, depth {depth}); pass --sam {found} (kind={found!r})"


def _inspect_sam_file(state: Mapping[str, Any], path: Path, kind: str, backend: str) -> bool:
    """Refuse files that are not a SAM of ``kind`` usable by ``backend``; return whether it is Meta's layout."""
    cfg = SAM_CONFIGS[kind]
    if _is_meta_sam(state):
        meta, prefix = True, "image_encoder."
    elif _is_timm_sam(state):
        if backend == "segment_anything":
            raise CheckpointError(
                f"SAM checkpoint {path} is a timm encoder-only file (no prompt encoder or mask decoder); use "
                f"backend='timm' for the aggregation alone, or Meta's file ({cfg['url'] or 'sam_vit_*.pth'}) for the "
                "segment_anything backend")
        meta, prefix = False, ""
    elif _loading._is_clip_layout(state):
        raise CheckpointError(
            f"{path}: this file is a CLIP checkpoint, not SAM; pass it as --pretrained (CLIP weights), and Meta's "
            f"{cfg['checkpoint'] or 'sam_vit_*.pth'} as --sam-weights")
    elif _loading._is_timm_vit_layout(state):
        found = _loading.describe_vit(state) or "a timm ViT"
        raise CheckpointError(
            f"{path}: this file looks like a timm/DINO ViT checkpoint ({found}), not SAM; pass it as --vfm-weights, "
            f"and Meta's {cfg['checkpoint'] or 'sam_vit_*.pth'} as --sam-weights")
    else:
        keys = [k for k in state][:4]
        raise CheckpointError(
            f"{path} is not a SAM checkpoint (no 'image_encoder.' keys; e.g. keys {keys}); pass Meta's "
            f"{cfg['checkpoint'] or 'sam_vit_*.pth'} ({cfg['url'] or 'see SAM_CONFIGS'})")
    width, depth = _sam_arch(state, prefix)
    if (width, depth) != (cfg["embed_dim"], cfg["depth"]):
        raise CheckpointError(
            f"SAM checkpoint {path} does not fit --sam {kind} ({cfg['title']}): this file is "
            + _describe_sam(width, depth))
    return meta


def _load_state(model: nn.Module, state: dict[str, Any], path: Path, kind: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        expected = set(model.state_dict())
        missing = sorted(expected - set(state))[:4]
        extra = sorted(set(state) - expected)[:4]
        detail = f"missing {missing}" if missing else ""
        detail += (", " if detail and extra else "") + (f"unexpected {extra}" if extra else "")
        raise CheckpointError(
            f"SAM checkpoint {path} does not load into {SAM_CONFIGS[kind]['title']} "
            f"({detail or _loading._one_line(err)}); pass Meta's unmodified {SAM_CONFIGS[kind]['checkpoint'] or 'file'}"
        ) from err


def _offline_error(kind: str, why: str) -> WeightsUnavailableError:
    cfg = SAM_CONFIGS[kind]
    if cfg["url"] is None:
        return WeightsUnavailableError(
            f"the {cfg['title']} ({kind!r}) has no pretrained weights; pass checkpoint='random' (tests, benchmarks)")
    return WeightsUnavailableError(
        f"{why}; download {cfg['url']} once and pass it: --sam-weights FILE (checkpoint=FILE in Python), "
        "or checkpoint='random' for a meaningless dry run")


def load_sam(
    kind: str = "vit_b",
    checkpoint: str | os.PathLike | None = None,
    *,
    backend: str = "segment_anything",
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> SamBackbone:
    """Build a SAM for Trident and load its weights (spec §9-§10).

    Args:
        kind: ``"vit_b"`` (Trident's default), ``"vit_l"``, ``"vit_h"``, or ``"test"`` (tiny, random only).
        checkpoint: a local file (Meta's ``sam_vit_*.pth``; for ``backend="timm"`` also a timm ``samvit`` state
            dict), ``"random"`` for random weights (``"none"`` and ``""`` too, as in :func:`load_clip`), or ``None`` for pretrained weights: segment_anything has no
            downloader, so ``None`` is an error naming the file to fetch; timm downloads from the Hugging Face hub
            when it is reachable.
        backend: ``"segment_anything"`` (needs ``cass_plugins[sam]``; encoder + prompt encoder + mask decoder) or
            ``"timm"`` (encoder only: aggregation, no refinement).
        device: where to put the model.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` for the image encoder (module docstring); ViT-H in fp16 is
            refused (T-Q12).

    Raises:
        ValueError: unknown kind / backend / precision, ViT-H in fp16, or an unusable ``checkpoint`` value.
        ImportError: backend segment_anything without the package (names the extra).
        FileNotFoundError: the file does not exist.
        CheckpointError: corrupt/unsafe file, not a SAM (a CLIP or DINO file is named as such), another SAM size
            (named), or keys that do not load strictly.
        WeightsUnavailableError: ``checkpoint=None`` and the weights cannot be obtained (names the URL).
    """
    cfg = _check_kind(kind)
    _check_backend(backend)
    if precision not in _PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {sorted(_PRECISIONS)}")
    if kind == "vit_h" and precision == "fp16":
        raise ValueError(
            "SAM ViT-H in fp16 is refused: it is known to produce garbage (segment-anything#540, trident.md T-Q12); "
            "use precision='fp32' (recommended) or 'bf16'")
    if backend == "segment_anything":
        _require_segment_anything()
    dtype = _PRECISIONS[precision]
    text = None if checkpoint is None else str(checkpoint)
    if text is not None and text.lower() in _loading.RANDOM_WEIGHTS:
        model = build_sam(kind, backend)
        log.warning("SAM %s has RANDOM weights: the affinity is meaningless", kind)
    elif text is not None:
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"SAM checkpoint file not found: {text} (pass Meta's {cfg['checkpoint'] or 'sam_vit_*.pth'} file, "
                "or 'random')")
        state = read_checkpoint(path, "SAM checkpoint")
        meta = _inspect_sam_file(state, path, kind, backend)
        model = build_sam(kind, backend)
        if backend == "timm" and meta:
            from timm.models.vision_transformer_sam import checkpoint_filter_fn

            state = checkpoint_filter_fn(state, model)
        _load_state(model, state, path, kind)
    elif backend == "segment_anything":
        raise _offline_error(kind, f"segment_anything cannot download the {cfg['title']} weights")
    else:
        if cfg["timm_name"] is None:
            raise _offline_error(kind, "")
        if not _loading._hub_reachable():
            raise _offline_error(kind, f"the Hugging Face hub is unreachable for timm's {cfg['timm_name']}.sa1b")
        try:
            with _loading._OfflineHub():
                model = _build_timm(kind, pretrained=True).eval()
        except Exception as err:  # network errors come from several libraries
            raise _offline_error(
                kind, f"could not obtain timm weights {cfg['timm_name']}.sa1b ({_loading._one_line(err)})"
            ) from err
    model = model.to(device or "cpu")
    if backend == "segment_anything":
        # the image encoder and SAM's normalisation in `dtype`; prompt encoder and mask decoder stay float32 (§12.17)
        model.image_encoder.to(dtype)
        model.pixel_mean = model.pixel_mean.to(dtype)
        model.pixel_std = model.pixel_std.to(dtype)
    else:
        model = model.to(dtype)
    return SamBackbone(model.eval(), kind=kind)
