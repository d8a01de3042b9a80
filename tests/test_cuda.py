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


# ------------------------------------------------------------------------------------------------ issue 13
def _count_syncs(fn) -> int:
    """Synchronising CUDA calls made by ``fn()`` (``torch.cuda.set_sync_debug_mode('warn')`` warns once per call)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


@pytest.mark.parametrize("lowrank", ["randomized", "exact"])
def test_cass_forward_synchronises_a_fixed_number_of_times_per_batch(lowrank) -> None:
    # the spectral math stays on the device; the (B, 4, 4) costs cross once, whatever the number of windows B
    model, vfm = make_tiny_clip(3).cuda(), make_tiny_vfm(4).cuda()
    with torch.no_grad(), cp.patch_clip(model, vfm, lowrank=lowrank) as handle:
        counts = {}
        for b in (2, 12):
            x = torch.randn(b, 3, 64, 96, device="cuda")
            cp.encode_dense(model, x)  # warm-up: cuBLAS/cuSOLVER handles, the cached test matrix
            torch.cuda.synchronize()
            counts[b] = _count_syncs(lambda: cp.encode_dense(model, x))
            assert len(handle.last_matching) == b
    print("synchronisations per forward:", counts)
    assert counts[2] == counts[12]
    # input + two output finiteness checks, the spectra's solver checks, the costs, the low rank's solver check,
    # the ranks: a handful, never one per window
    assert counts[12] <= 12


def test_spectral_device_path_matches_the_cpu_float64_path_on_cuda() -> None:
    from cass_plugins.cass import spectral

    keys = torch.randn(2, 12, 196, 64, dtype=torch.float64)
    graph = spectral.attention_graph(keys, 0.125)
    for method in ("randomized", "exact", "energy"):
        g = graph if method == "randomized" else None
        ref, ref_ranks = spectral.distilled_vfm_graph(g, vfm_keys=keys, scale=0.125, lowrank=method, rank=10)
        out, ranks = spectral.distilled_vfm_graph(None if g is None else g.float().cuda(), vfm_keys=keys.float().cuda(),
                                                  scale=0.125, lowrank=method, rank=10)
        assert out.is_cuda and out.dtype == torch.float32
        assert torch.equal(ranks.cpu(), ref_ranks)
        assert ((out.cpu().double() - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_segment_many_on_cuda_equals_segment_one_by_one() -> None:
    import skimage.data

    photos = [skimage.data.chelsea(), skimage.data.astronaut()[:200, :350], skimage.data.coffee()[::2, ::3]]
    with cp.Segmenter(make_tiny_clip(3), make_tiny_vfm(4), vocabulary="cat; dog; sky", device="cuda",
                      tie_break="sequential", short_side=96, crop=64, stride=32) as seg:
        one = [seg.segment(p) for p in photos]
        many = list(seg.segment_many(photos, batch_size=3))
    for a, b in zip(one, many):
        # cuBLAS may pick another kernel for a larger batch: rounding-level differences only
        torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=0)
        assert (a.labels == b.labels).float().mean() > 0.999
        assert [m.window for m in b.record["matching"]] == [m.window for m in a.record["matching"]]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_pipeline_on_cuda_agrees_with_float32(precision: str) -> None:
    import skimage.data

    image = skimage.data.astronaut()
    kw = dict(vocabulary="person; rocket; flag; sky; sea", device="cuda", short_side=128, crop=64, stride=32,
              matching=[0, 1, 2, 3])
    with cp.Segmenter(make_tiny_clip(3), make_tiny_vfm(4), **kw) as seg:
        ref = seg.segment(image)
    with cp.Segmenter(make_tiny_clip(3), make_tiny_vfm(4), precision=precision, **kw) as seg:
        out = list(seg.segment_many([image, image], batch_size=2))[1]
    agree = (out.logits.argmax(0) == ref.logits.argmax(0)).float().mean().item()
    print(f"{precision}: {100 * agree:.2f} % of the pixels keep their float32 argmax")
    assert agree >= 0.99


def test_trident_on_cuda_matches_cpu() -> None:
    """Splice mode + SAM aggregation + refinement on the GPU: the logits of the CPU run, the SAM pass on the GPU."""
    from tiny_sam import make_tiny_sam, random_image

    image = torch.from_numpy(random_image(70, 100)).permute(2, 0, 1).contiguous()
    kw = dict(preset="trident", vocabulary=["cat", "dog; puppy", "sky"], crop=64, stride=32, short_side=64,
              **{"sam_refine.min_area": 4, "sam_refine.coarse_thresh": 0.0})
    results = {}
    for device in ("cpu", "cuda"):
        clip, vfm, sam = make_tiny_clip(), make_tiny_vfm(patch_size=16), make_tiny_sam()
        sam.model.to(device)
        sam = type(sam)(sam.model, kind=sam.kind)
        with cp.Segmenter(clip, vfm, sam=sam, device=device, **kw) as seg:
            results[device] = seg.segment(image)
    assert results["cuda"].record["sam_grids"] == results["cpu"].record["sam_grids"]
    torch.testing.assert_close(results["cuda"].logits, results["cpu"].logits, atol=2e-3, rtol=2e-3)
    agree = (results["cuda"].labels == results["cpu"].labels).float().mean().item()
    print(f"trident CPU/CUDA label agreement: {agree:.4f}")
    assert agree > 0.98
