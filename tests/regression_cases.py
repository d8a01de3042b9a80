"""The inputs of the preset regression test: tiny seeded models, two crops, one image, one vocabulary."""
from __future__ import annotations

import torch

from conftest import make_tiny_clip, make_tiny_vfm

#: Presets recorded before the component-model refactor (every preset the library shipped then).
PRESETS = (
    "cass-official", "cass-paper", "cdam-clearclip", "cdam-maskclip", "cdam-paper", "cdam-sclip", "clearclip",
    "clearclip-shipped", "maskclip", "maskclip-original", "naclip", "proxyclip", "sclip", "vanilla",
)
VOCABULARY = "cat; dog, puppy; sky; grass"


def preset_names() -> tuple[str, ...]:
    return PRESETS


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    crops = torch.randn(2, 3, 64, 96, generator=g) * 0.8
    image = (torch.rand(3, 72, 120, generator=g) * 255).to(torch.uint8)
    return crops, image


def compute_outputs(preset: str) -> dict[str, torch.Tensor]:
    """Dense features of two crops and Segmenter logits of one image under ``preset`` (exact low rank)."""
    import cass_plugins as cp

    clip, vfm = make_tiny_clip(0), make_tiny_vfm(1)
    crops, image = _inputs()
    # fixed explicit matching: random weights tie the head matching (docs/matching.md), which would make the
    # reference depend on float rounding; the solver itself is covered by tests/test_matching.py
    spectral = {"matching": [2, 0, 3, 1], "lowrank": "exact"}
    with torch.no_grad():
        handle = cp.patch_clip(clip, vfm, preset)
        uses_spectral = "spectral" in _names(handle)
        handle.remove()
        kw = spectral if uses_spectral else {}
        # CDAM needs the vocabulary's text for its attention: only its Segmenter output is recorded
        features = torch.zeros(0)
        if not preset.startswith("cdam"):
            with cp.patch_clip(clip, vfm, preset, **kw):
                features = cp.encode_dense(clip, crops).features
        protocol = {"short_side": 64, "crop": 64, "stride": 32}
        with cp.Segmenter(clip, vfm, preset=preset, **protocol, **kw) as seg:
            result = seg.segment(image, VOCABULARY)
    # every 4th pixel of the logits keeps the stored file small; the labels are kept whole
    return {
        "features": features.clone(), "logits": result.logits[:, ::4, ::4].clone(),
        "labels": result.labels.to(torch.uint8).clone(),
    }


def _names(handle) -> list[str]:
    return [name for name, _ in handle.pm.list_name_plugin()]
