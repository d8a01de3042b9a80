"""Shared fixtures: tiny random-weight models of every backbone family."""
from __future__ import annotations

import pytest
import torch

TINY_CLIP = "cass-tiny-vit"
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _register_tiny_clip() -> None:
    # open_clip.add_model_config only reads JSON files; the registry itself is a plain dict.
    from open_clip.factory import _MODEL_CONFIGS

    _MODEL_CONFIGS[TINY_CLIP] = TINY_CLIP_CFG


def make_tiny_clip(seed: int = 0) -> torch.nn.Module:
    """A 2-layer, 4-head open_clip ViT with random weights (patch 16, native 64×64)."""
    import open_clip

    _register_tiny_clip()
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    return model.eval()


def make_tiny_vfm(seed: int = 1, patch_size: int = 8, reg_tokens: int = 0) -> torch.nn.Module:
    """A 2-layer, 4-head timm VisionTransformer standing in for DINO (native 32×32, patch 8)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=32, patch_size=patch_size, embed_dim=48, depth=2, num_heads=4, num_classes=0,
        reg_tokens=reg_tokens, no_embed_class=reg_tokens > 0, dynamic_img_size=True,
    )
    return model.eval()


@pytest.fixture(autouse=True)
def _private_text_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the on-disk text-embedding cache at a fresh folder per test: never the user's ~/.cache."""
    monkeypatch.setenv("CASS_PLUGINS_CACHE_DIR", str(tmp_path_factory.mktemp("text_cache")))
    monkeypatch.delenv("CASS_PLUGINS_NO_CACHE", raising=False)


@pytest.fixture
def tiny_clip() -> torch.nn.Module:
    return make_tiny_clip()


@pytest.fixture
def tiny_vfm() -> torch.nn.Module:
    return make_tiny_vfm()


@pytest.fixture
def openai_clip() -> torch.nn.Module:
    from openai_style import make_openai_style_clip

    return make_openai_style_clip()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``cuda`` when no GPU is present (run them whenever one is)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
