"""CUDA: the same patched forward and pipeline on the GPU as on the CPU (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

import cass_plugins as cp
from conftest import make_tiny_clip, make_tiny_vfm

pytestmark = pytest.mark.cuda


def test_patched_dense_features_match_cpu() -> None:
    model, vfm = make_tiny_clip(3), make_tiny_vfm(4)
    x = torch.randn(2, 3, 96, 128)
    kw = dict(matching=[0, 1, 2, 3], lowrank="exact")  # same assignment on both devices (cass.md §10)
    with torch.no_grad(), cp.patch_clip(model, vfm, **kw):
        cpu = cp.encode_dense(model, x).features
    model, vfm = model.cuda(), vfm.cuda()
    with torch.no_grad(), cp.patch_clip(model, vfm, **kw) as handle:
        gpu = cp.encode_dense(model, x.cuda()).features
        assert handle.last_matching[0].assignment.tolist() == [0, 1, 2, 3]
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-3, rtol=2e-3)
    assert not any(m._forward_hooks for m in model.modules())


def test_default_matching_on_cuda_is_optimal_and_deterministic() -> None:
    model, vfm = make_tiny_clip(3).cuda(), make_tiny_vfm(4).cuda()
    x = torch.randn(2, 3, 96, 128, device="cuda")
    runs = []
    for _ in range(2):
        with torch.no_grad(), cp.patch_clip(model, vfm) as handle:
            feats = cp.encode_dense(model, x).features
            runs.append((feats, [m.assignment.tolist() for m in handle.last_matching]))
            assert all(m.margin >= 0 for m in handle.last_matching)
    assert runs[0][1] == runs[1][1]
    assert torch.equal(runs[0][0], runs[1][0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_on_cuda(dtype: torch.dtype) -> None:
    model, vfm = make_tiny_clip(3), make_tiny_vfm(4)
    x = torch.randn(1, 3, 96, 128)
    kw = dict(matching=[0, 1, 2, 3], lowrank="exact")
    with torch.no_grad(), cp.patch_clip(model, vfm, **kw):
        ref = cp.encode_dense(model, x).features
    model, vfm = model.cuda().to(dtype), vfm.cuda().to(dtype)
    with torch.no_grad(), cp.patch_clip(model, vfm, **kw):
        out = cp.encode_dense(model, x.cuda().to(dtype)).features
    assert out.dtype == dtype and torch.isfinite(out).all()
    cos = torch.nn.functional.cosine_similarity(out.float().cpu(), ref, dim=-1)
    assert cos.min() > 0.97


def test_segmenter_on_cuda_matches_cpu_labels() -> None:
    import skimage.data

    image = skimage.data.chelsea()[::2, ::2]
    results = {}
    for device in ("cpu", "cuda"):
        model, vfm = make_tiny_clip(3), make_tiny_vfm(4)
        with cp.Segmenter(model, vfm, vocabulary="cat; dog; sky", device=device, matching=[0, 1, 2, 3],
                          lowrank="exact", short_side=128) as seg:
            results[device] = seg.segment(image)
    agree = (results["cpu"].labels == results["cuda"].labels).float().mean()
    assert agree > 0.99
    torch.testing.assert_close(results["cuda"].logits, results["cpu"].logits, atol=2e-3, rtol=2e-3)
