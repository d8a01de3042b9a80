"""Backbone access on every supported family, checked against the models' own forward passes."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cass_plugins.backbone.access import interpolate_pos_embed, vit_access
from conftest import TINY_CLIP_CFG, make_tiny_clip, make_tiny_vfm
from openai_style import make_openai_style_clip


def sequence_first_open_clip(seed: int = 0) -> nn.Module:
    """The tiny open_clip model rebuilt with the pre-2.26 sequence-first transformer (same weights)."""
    from open_clip.transformer import Transformer

    model = make_tiny_clip(seed)
    old = model.visual.transformer
    vc = TINY_CLIP_CFG["vision_cfg"]
    new = Transformer(vc["width"], vc["layers"], vc["width"] // vc["head_width"], batch_first=False,
                      act_layer=type(old.resblocks[0].mlp.gelu))
    new.load_state_dict(old.state_dict())
    model.visual.transformer = new
    return model.eval()


def custom_block_open_clip(seed: int = 0) -> nn.Module:
    """open_clip with its own ``Attention`` module (returns a tensor) in every block."""
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS

    cfg = copy.deepcopy(TINY_CLIP_CFG)
    cfg["vision_cfg"]["block_type"] = "custom"
    _MODEL_CONFIGS["cass-tiny-vit-custom"] = cfg
    torch.manual_seed(seed)
    return open_clip.create_model("cass-tiny-vit-custom", pretrained=None).eval()


def timm_trunk_open_clip(seed: int = 0) -> nn.Module:
    """open_clip wrapping a timm ViT trunk (TimmModel) with a linear projection head."""
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit", "timm_model_pretrained": False,
                       "timm_pool": "token", "timm_proj": "linear"},
        "text_cfg": TINY_CLIP_CFG["text_cfg"],
    }
    _MODEL_CONFIGS["cass-tiny-timm"] = cfg
    torch.manual_seed(seed)
    return open_clip.create_model("cass-tiny-timm", pretrained=None).eval()


ALL_CLIPS = {
    "open_clip": make_tiny_clip,
    "open_clip_seq_first": sequence_first_open_clip,
    "open_clip_custom_attn": custom_block_open_clip,
    "openai_style": make_openai_style_clip,
    "open_clip_timm_trunk": timm_trunk_open_clip,
}


def native_size(model: nn.Module) -> int:
    acc = vit_access(model)
    return acc.native_grid[0] * acc.patch_size[0]


@pytest.mark.parametrize("family", sorted(ALL_CLIPS))
def test_embed_blocks_head_reproduce_encode_image(family: str) -> None:
    model = ALL_CLIPS[family]()
    acc = vit_access(model)
    side = native_size(model)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        tokens, grid = acc.embed(x)
        tokens = acc.run_blocks(tokens, acc.blocks)
        ours = acc.head(tokens)[:, 0]
        ref = model.encode_image(x)
    assert grid == acc.native_grid
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(ALL_CLIPS))
def test_qkv_out_proj_residual_reproduce_last_block(family: str) -> None:
    model = ALL_CLIPS[family]()
    acc = vit_access(model)
    side = native_size(model)
    with torch.no_grad():
        tokens, _ = acc.embed(torch.randn(2, 3, side, side))
        x = acc.run_blocks(tokens, acc.blocks[:-1])
        q, k, v = acc.qkv(x)
        assert q.shape == (2, acc.num_heads, x.shape[1], acc.head_dim)
        attn = torch.softmax(acc.scale * q @ k.transpose(-1, -2), dim=-1)
        ours = acc.residual_mlp(x, acc.out_proj(attn @ v))
        ref = acc.run_blocks(x, [acc.last_block])
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_qkv_head_split_follows_in_proj_rows(tiny_clip: nn.Module) -> None:
    """Head j of k uses rows D + j·Dh … D + (j+1)·Dh of in_proj (baselines.md §0)."""
    acc = vit_access(tiny_clip)
    blk = acc.last_block
    x = torch.randn(1, 5, acc.width, dtype=torch.float64)
    blk64 = copy.deepcopy(blk).double()
    acc64 = copy.copy(acc)
    acc64.blocks = [blk64]
    _, k, _ = acc64.qkv(x, blk64)
    u = blk64.ln_1(x)
    d, dh = acc.width, acc.head_dim
    for j in range(acc.num_heads):
        w = blk64.attn.in_proj_weight[d + j * dh: d + (j + 1) * dh]
        b = blk64.attn.in_proj_bias[d + j * dh: d + (j + 1) * dh]
        torch.testing.assert_close(k[0, j], u[0] @ w.T + b)


def test_timm_vfm_tokens_match_forward_features() -> None:
    for reg in (0, 4):
        vfm = make_tiny_vfm(reg_tokens=reg)
        acc = vit_access(vfm)
        assert acc.num_prefix_tokens == 1 + reg
        assert acc.pos_interp == ("size" if reg else "dino")
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            tokens, _ = acc.embed(x)
            tokens = vfm.norm(acc.run_blocks(tokens, acc.blocks))
            torch.testing.assert_close(tokens, vfm.forward_features(x))


def test_pos_embed_dino_rule_matches_explicit_scale_factor() -> None:
    """+0.1 rule: sampled with scale_factor (g+0.1)/G, not by size (baselines.md §2)."""
    torch.manual_seed(0)
    table = torch.randn(14 * 14, 8, dtype=torch.float64)
    out = interpolate_pos_embed(table, (14, 14), (21, 28), "dino")
    grid = table.reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=(21.1 / 14, 28.1 / 14), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out, ref.permute(0, 2, 3, 1).reshape(-1, 8))
    by_size = F.interpolate(grid, size=(21, 28), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(-1, 8)
    assert (out - by_size).abs().max() > 1e-3  # the two rules really differ
    assert interpolate_pos_embed(table, (14, 14), (14, 14)) is table


def test_non_square_grid_of_native_token_count_is_interpolated(tiny_clip: nn.Module) -> None:
    """A 2×8 grid has the native 16 tokens; the table must still be resampled (quirk Q3, fixed)."""
    acc = vit_access(tiny_clip)
    x = torch.randn(1, 3, 32, 128)
    with torch.no_grad():
        tokens, grid = acc.embed(x)
    assert grid == (2, 8)
    pos = tiny_clip.visual.positional_embedding
    patches = tiny_clip.visual.conv1(x).flatten(2).transpose(1, 2)
    expected = interpolate_pos_embed(pos[1:], (4, 4), (2, 8), "dino")
    torch.testing.assert_close(tokens, tiny_clip.visual.ln_pre(torch.cat(
        [(tiny_clip.visual.class_embedding + pos[0])[None, None], patches + expected], dim=1)))


def test_unsupported_models_raise_type_error() -> None:
    import torchvision

    for model in (nn.Conv2d(3, 8, 3), torchvision.models.resnet18()):
        with pytest.raises(TypeError, match="not a supported Vision Transformer.*Supported"):
            vit_access(model)


def test_image_smaller_than_a_patch_is_refused(tiny_clip: nn.Module) -> None:
    with pytest.raises(ValueError, match="smaller than one"):
        vit_access(tiny_clip).embed(torch.randn(1, 3, 8, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vit_access(tiny_clip).embed(torch.randn(3, 64, 64))


@pytest.mark.slow
@pytest.mark.parametrize("name, heads, prefix, interp", [
    ("vit_base_patch8_224.dino", 12, 1, "dino"),
    ("vit_base_patch16_224.dino", 12, 1, "dino"),
    ("vit_small_patch8_224.dino", 6, 1, "dino"),
    ("vit_small_patch16_224.dino", 6, 1, "dino"),
    ("vit_base_patch14_reg4_dinov2.lvd142m", 12, 5, "size"),
])
def test_full_size_vfm_families_give_keys(name: str, heads: int, prefix: int, interp: str) -> None:
    """Every VFM the spec names (cass.md §2) yields last-block keys on a non-native square input."""
    from cass_plugins.core.vfm import VFMRunner
    from cass_plugins.backbone.loading import load_vfm

    vfm = load_vfm(name, "random")
    runner = VFMRunner(vfm)
    try:
        acc = runner.access
        assert (acc.num_heads, acc.num_prefix_tokens, acc.pos_interp) == (heads, prefix, interp)
        with torch.no_grad():
            keys, grid = runner.keys(torch.randn(1, 3, 224, 336))  # square side 224 (cass.md §2.1)
        side = 224 // acc.patch_size[0]
        assert grid == (side, side) and keys.shape == (1, heads, side * side, acc.head_dim)
        assert torch.isfinite(keys).all()
    finally:
        runner.remove()
    assert not vfm.blocks[-1]._forward_pre_hooks
