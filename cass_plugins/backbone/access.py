"""Backbone access: the only module that knows how ViT implementations name their parts.

Three families are supported, all through :func:`vit_access`:

* open_clip ``VisionTransformer`` (``model.visual``), with ``nn.MultiheadAttention`` blocks in either token layout
  (sequence-first before open_clip 2.26, batch-first after) or open_clip's own ``Attention`` module that returns a
  tensor;
* OpenAI-``clip``-style models (the structure SCLIP/NACLIP/CASS fork: ``visual.conv1``, ``visual.transformer.resblocks``,
  sequence-first ``nn.MultiheadAttention``);
* timm ``VisionTransformer`` - as a VFM (DINO v1, DINOv2 with registers) or as the CLIP image trunk that open_clip
  wraps in ``TimmModel``.

Inside the library tokens are always batch-first ``(B, T, D)`` with the prefix tokens (CLS, registers) first, and
per-head tensors are ``(B, h, T, Dh)``. :class:`ViTAccess` converts from and to the layout the block itself sees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ViTAccess", "vit_access", "vfm_family", "interpolate_pos_embed", "SUPPORTED_BACKBONES"]

SUPPORTED_BACKBONES = (
    "open_clip CLIP models (VisionTransformer or TimmModel image towers), OpenAI-clip-style models "
    "(visual.conv1 / visual.transformer.resblocks), and timm VisionTransformer models"
)

PosInterp = Literal["dino", "size"]


def interpolate_pos_embed(pos: Tensor, native: tuple[int, int], grid: tuple[int, int], mode: PosInterp = "dino") -> Tensor:
    """Resample a patch positional-embedding table to another grid.

    Args:
        pos: ``(Gh*Gw, D)`` patch rows only (no prefix rows), row-major.
        native: the table's own grid ``(Gh, Gw)``.
        grid: the target grid ``(gh, gw)``.
        mode: ``"dino"`` - bicubic with ``scale_factor=((gh+0.1)/Gh, (gw+0.1)/Gw)``, as DINO v1 and the CLIP forks
            do it (baselines.md §2: the sample positions depend on passing a scale factor, not a size);
            ``"size"`` - bicubic to the size with antialiasing (DINOv2 with registers).

    Returns:
        ``(gh*gw, D)`` in the input dtype.
    """
    if tuple(native) == tuple(grid):
        return pos
    dim = pos.shape[-1]
    table = pos.to(torch.promote_types(pos.dtype, torch.float32)).reshape(1, native[0], native[1], dim).permute(0, 3, 1, 2)
    if mode == "dino":
        scale = ((grid[0] + 0.1) / native[0], (grid[1] + 0.1) / native[1])
        out = F.interpolate(table, scale_factor=scale, mode="bicubic", align_corners=False, recompute_scale_factor=False)
    elif mode == "size":
        out = F.interpolate(table, size=grid, mode="bicubic", align_corners=False, antialias=True)
    else:
        raise ValueError(f"unknown positional-embedding interpolation {mode!r}; use 'dino' or 'size'")
    if tuple(out.shape[-2:]) != tuple(grid):
        raise RuntimeError(f"positional-embedding interpolation produced {tuple(out.shape[-2:])}, expected {grid}")
    return out.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], dim).to(pos.dtype)


@dataclass
class ViTAccess:
    """Uniform access to one ViT's embedding, blocks, last-block internals and output head.

    Attributes:
        family: ``"open_clip"`` (also OpenAI-clip-style) or ``"timm"``.
        module: the image tower (``model.visual`` or the timm model / trunk).
        blocks: the transformer blocks in order.
        num_heads: heads of the last block.
        head_dim: channels per head.
        patch_size: ``(ph, pw)``.
        native_grid: grid of the positional-embedding table.
        num_prefix_tokens: CLS (+ register) tokens before the patches.
        batch_first: layout of the tokens the blocks see.
        pos_interp: how the positional table is resampled to other grids.
        head_fn: final norm + projection applied to every token (``None`` for a VFM without a projection).
        final_norm: the norm after the last block alone (a timm VFM's ``norm``; ProxyCLIP's features), if any.
        patch_embed: the module that receives the raw image (where the image is observed by a pre-hook).
    """

    family: str
    module: nn.Module
    blocks: nn.ModuleList | nn.Sequential
    num_heads: int
    head_dim: int
    patch_size: tuple[int, int]
    native_grid: tuple[int, int]
    num_prefix_tokens: int
    batch_first: bool
    pos_interp: PosInterp
    patch_embed: nn.Module
    head_fn: Callable[[Tensor], Tensor] | None = None
    final_norm: Callable[[Tensor], Tensor] | None = None

    # ----------------------------------------------------------------------------------------------- properties
    @property
    def last_block(self) -> nn.Module:
        return self.blocks[-1]

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.weight.dtype if hasattr(self.patch_embed, "weight") else next(self.module.parameters()).dtype

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid of an input of this size (the patch conv floors)."""
        return height // self.patch_size[0], width // self.patch_size[1]

    # ----------------------------------------------------------------------------------------------- layout
    def to_batch_first(self, x: Tensor) -> Tensor:
        return x if self.batch_first else x.transpose(0, 1)

    def from_batch_first(self, x: Tensor) -> Tensor:
        return x if self.batch_first else x.transpose(0, 1)

    # ----------------------------------------------------------------------------------------------- forward pieces
    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch embedding + prefix tokens + (interpolated) positional embedding + pre-norm.

        Returns:
            tokens ``(B, T, D)`` batch-first, and the patch grid ``(gh, gw)``.
        """
        m = self.module
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a batch of RGB images (B, 3, H, W), got shape {tuple(images.shape)}")
        grid = self.grid_for(images.shape[-2], images.shape[-1])
        if grid[0] < 1 or grid[1] < 1:
            raise ValueError(
                f"image of {tuple(images.shape[-2:])} is smaller than one {self.patch_size} patch; resize it first"
            )
        images = images.to(self.dtype)
        if self.family == "open_clip":
            x = m.conv1(images).flatten(2).transpose(1, 2)
            pos = m.positional_embedding.to(x.dtype)
            patch_pos = interpolate_pos_embed(pos[1:], self.native_grid, grid, self.pos_interp)
            cls = m.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], 1, -1)
            x = torch.cat([cls + pos[:1], x + patch_pos], dim=1)
            return m.ln_pre(x), grid
        # timm
        pe = m.patch_embed
        x = pe.proj(images).flatten(2).transpose(1, 2)
        x = pe.norm(x)
        prefix = []
        if getattr(m, "cls_token", None) is not None:
            prefix.append(m.cls_token.expand(x.shape[0], -1, -1))
        if getattr(m, "reg_token", None) is not None:
            prefix.append(m.reg_token.expand(x.shape[0], -1, -1))
        pre = torch.cat(prefix, dim=1) if prefix else x[:, :0]
        if m.pos_embed is not None:
            pos = m.pos_embed[0].to(x.dtype)
            # without no_embed_class the table has one row per prefix token before the patch rows
            n_pos_prefix = 0 if getattr(m, "no_embed_class", False) else self.num_prefix_tokens
            x = x + interpolate_pos_embed(pos[n_pos_prefix:], self.native_grid, grid, self.pos_interp)
            pre = pre + pos[:n_pos_prefix][None] if n_pos_prefix else pre
        x = torch.cat([pre, x], dim=1)
        x = m.patch_drop(x) if hasattr(m, "patch_drop") else x
        x = m.norm_pre(x) if hasattr(m, "norm_pre") else x
        return x, grid

    def run_blocks(self, x: Tensor, blocks: nn.ModuleList | list) -> Tensor:
        """Run ``blocks`` on batch-first tokens, converting to the blocks' own layout and back."""
        y = self.from_batch_first(x)
        for blk in blocks:
            y = blk(y)
        return self.to_batch_first(y)

    def layer_norm_1(self, block: nn.Module, x: Tensor) -> Tensor:
        return block.ln_1(x) if self.family == "open_clip" else block.norm1(x)

    def qkv(self, x: Tensor, block: nn.Module | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head q, k, v of ``block`` (default: the last) for its batch-first input ``x``.

        Returns:
            three ``(B, h, T, Dh)`` tensors; q/k include any q/k normalisation the block applies.
        """
        block = self.last_block if block is None else block
        u = self.layer_norm_1(block, x)
        return self.qkv_from_normed(u, block)

    def qkv_from_normed(self, u: Tensor, block: nn.Module | None = None) -> tuple[Tensor, Tensor, Tensor]:
        block = self.last_block if block is None else block
        attn = block.attn
        b, t, _ = u.shape
        h, dh = self.num_heads, self.head_dim
        if self.family == "open_clip":
            # in_proj rows [0, D) are q, [D, 2D) k, [2D, 3D) v; head j owns channels [j·Dh, (j+1)·Dh)
            y = F.linear(u, attn.in_proj_weight, attn.in_proj_bias)
            q, k, v = (z.reshape(b, t, h, dh).transpose(1, 2) for z in y.chunk(3, dim=-1))
            if hasattr(attn, "ln_q"):
                q, k = attn.ln_q(q), attn.ln_k(k)
            return q, k, v
        y = attn.qkv(u).reshape(b, t, 3, h, dh).permute(2, 0, 3, 1, 4)
        q, k, v = y.unbind(0)
        q = attn.q_norm(q) if hasattr(attn, "q_norm") else q
        k = attn.k_norm(k) if hasattr(attn, "k_norm") else k
        return q, k, v

    def out_proj(self, o: Tensor, block: nn.Module | None = None) -> Tensor:
        """Concatenate heads ``(B, h, T, Dh)`` and apply the block's output projection → ``(B, T, D)``."""
        block = self.last_block if block is None else block
        b, h, t, dh = o.shape
        o = o.transpose(1, 2).reshape(b, t, h * dh)
        attn = block.attn
        if self.family == "open_clip":
            if getattr(attn, "head_scale", None) is not None or not isinstance(getattr(attn, "ln_inner", nn.Identity()), nn.Identity):
                raise NotImplementedError("open_clip attention with head_scale/inner norm is not supported")
            return attn.out_proj(o)
        o = attn.norm(o) if hasattr(attn, "norm") else o
        return attn.proj(o)

    def residual_mlp(self, x: Tensor, attn_out: Tensor, block: nn.Module | None = None) -> Tensor:
        """The rest of a standard block: ``z = x + ls1(attn_out); z + ls2(mlp(ln_2(z)))``."""
        block = self.last_block if block is None else block
        if self.family == "open_clip":
            z = x + block.ls_1(attn_out) if hasattr(block, "ls_1") else x + attn_out
            mlp_in = block.ln_2(z)
            return z + (block.ls_2(block.mlp(mlp_in)) if hasattr(block, "ls_2") else block.mlp(mlp_in))
        z = x + block.ls1(attn_out)
        return z + block.ls2(block.mlp(block.norm2(z)))

    def head(self, tokens: Tensor) -> Tensor:
        """Final norm + projection on every token ``(B, T, D)`` → ``(B, T, d)``."""
        if self.head_fn is None:
            raise TypeError("this backbone has no projection head (it is a VFM)")
        return self.head_fn(tokens)


def _is_timm_vit(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("patch_embed", "blocks", "pos_embed")) and hasattr(m.patch_embed, "proj")


def _is_clip_visual(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("conv1", "class_embedding", "positional_embedding", "transformer", "ln_post"))


def _open_clip_access(visual: nn.Module) -> ViTAccess:
    blocks = visual.transformer.resblocks
    attn = blocks[-1].attn
    width = visual.conv1.out_channels
    if isinstance(attn, nn.MultiheadAttention):
        num_heads = attn.num_heads
        batch_first = bool(attn.batch_first)
    elif hasattr(attn, "in_proj_weight") and hasattr(attn, "num_heads"):
        num_heads = attn.num_heads
        batch_first = bool(getattr(visual.transformer, "batch_first", True))
        if getattr(attn, "scaled_cosine", False):
            raise TypeError("open_clip blocks with scaled-cosine attention are not supported (no q·k graph)")
    else:
        raise TypeError(f"unsupported attention module {type(attn).__name__} in the last CLIP block")
    if getattr(visual, "attn_pool", None) is not None:
        raise TypeError("CLIP towers with an attentional pooler (CoCa-style) are not supported")
    n_pos = visual.positional_embedding.shape[0] - 1
    side = math.isqrt(n_pos)
    native = tuple(getattr(visual, "grid_size", (side, side)))
    ps = visual.conv1.kernel_size

    def head_fn(tokens: Tensor, _v=visual) -> Tensor:
        z = _v.ln_post(tokens)
        return z @ _v.proj if _v.proj is not None else z

    return ViTAccess(
        family="open_clip", module=visual, blocks=blocks, num_heads=num_heads, head_dim=width // num_heads,
        patch_size=(ps[0], ps[1]), native_grid=(native[0], native[1]), num_prefix_tokens=1,
        batch_first=batch_first, pos_interp="dino", patch_embed=visual.conv1, head_fn=head_fn,
    )


def _timm_access(vit: nn.Module, head: nn.Module | None, pos_interp: PosInterp | None) -> ViTAccess:
    blk = vit.blocks[-1]
    attn = blk.attn
    if not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
        raise TypeError(f"unsupported timm attention {type(attn).__name__}: expected a fused qkv projection")
    num_heads = attn.num_heads
    head_dim = attn.head_dim if hasattr(attn, "head_dim") else attn.qkv.out_features // (3 * num_heads)
    ps = vit.patch_embed.patch_size
    native = tuple(vit.patch_embed.grid_size)
    n_reg = getattr(vit, "num_reg_tokens", 0) or 0
    if pos_interp is None:
        pos_interp = "size" if n_reg > 0 else "dino"

    head_fn = None
    if head is not None:
        def head_fn(tokens: Tensor, _v=vit, _h=head) -> Tensor:
            return _h(_v.norm(tokens))

    return ViTAccess(
        family="timm", module=vit, blocks=vit.blocks, num_heads=num_heads, head_dim=head_dim,
        patch_size=(ps[0], ps[1]), native_grid=(native[0], native[1]), num_prefix_tokens=vit.num_prefix_tokens,
        batch_first=True, pos_interp=pos_interp, patch_embed=vit.patch_embed.proj, head_fn=head_fn,
        final_norm=getattr(vit, "norm", None),
    )


def vfm_family(model: nn.Module) -> str:
    """What kind of vision model ``model`` is: ``"sam"`` (a SAM image encoder, timm ``samvit_*`` or Meta's
    ``ImageEncoderViT``), ``"mae"`` (timm's MAE weights) or ``"vit"`` (DINO, DINOv2 and other plain ViTs)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    tag = str(cfg.get("tag") or "").lower()
    arch = str(cfg.get("architecture") or "").lower()
    kind = type(model).__name__
    if hasattr(model, "neck") or "sam" in kind.lower() or kind == "ImageEncoderViT" or arch.startswith("samvit") \
            or "sam" in tag.split("_"):
        return "sam"
    if "mae" in tag.split("_"):
        return "mae"
    return "vit"


def vit_access(model: nn.Module, *, pos_interp: PosInterp | None = None) -> ViTAccess:
    """Build a :class:`ViTAccess` for a CLIP model, its image tower, or a timm ViT.

    Args:
        model: an open_clip ``CLIP`` / OpenAI-clip-style model (its ``.visual`` is used), an image tower, or a timm
            ``VisionTransformer`` (used as a VFM: no projection head).
        pos_interp: override the positional-embedding resampling (default: ``"dino"`` rule, ``"size"`` for timm
            models with register tokens, as DINOv2 does it).

    Raises:
        TypeError: for anything that is not a supported ViT, naming what is supported.
    """
    visual = getattr(model, "visual", model)
    if _is_clip_visual(visual):
        acc = _open_clip_access(visual)
    elif hasattr(visual, "trunk") and _is_timm_vit(visual.trunk):
        acc = _timm_access(visual.trunk, getattr(visual, "head", None), pos_interp)
        acc.module = visual.trunk
    elif _is_timm_vit(visual):
        acc = _timm_access(visual, None, pos_interp)
    else:
        raise TypeError(
            f"{type(model).__name__} is not a supported Vision Transformer. Supported: {SUPPORTED_BACKBONES}. "
            "Convolutional CLIP towers (ResNet, ConvNeXt) have no patch attention to patch."
        )
    if pos_interp is not None:
        acc.pos_interp = pos_interp
    return acc
