"""patch_clip / encode_dense: lifecycle, bit-identity after removal, errors, dtypes, plugins."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cass_plugins as cp
from cass_plugins.core.hookspecs import hookimpl
from conftest import make_tiny_vfm
from test_backbone import ALL_CLIPS, native_size


def outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        dense = cp.encode_dense(model, x)
        return dense.features, dense.image_embeds, model.encode_image(x[..., : native_size(model), : native_size(model)])


@pytest.mark.parametrize("family", sorted(ALL_CLIPS))
def test_patch_then_remove_is_bit_identical(family: str) -> None:
    model = ALL_CLIPS[family]()
    vfm = make_tiny_vfm()
    side = native_size(model)
    x = torch.randn(2, 3, side, side + 32)
    before = outputs(model, x)
    handle = cp.patch_clip(model, vfm=vfm)
    patched = outputs(model, x)
    assert not torch.equal(patched[0], before[0]), "the patch must change the dense features"
    torch.testing.assert_close(patched[1], before[1], rtol=0, atol=1e-6)  # CLS path is the unmodified block
    handle.remove()
    after = outputs(model, x)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    assert cp.get_patch(model) is None
    handle.remove()  # idempotent


def test_context_manager_removes_and_state_dict_is_untouched(tiny_clip: nn.Module, tiny_vfm: nn.Module) -> None:
    state = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    with cp.patch_clip(tiny_clip, vfm=tiny_vfm) as handle:
        assert handle.active and cp.get_patch(tiny_clip) is handle
        assert set(tiny_clip.state_dict()) == set(state)
    assert not handle.active and cp.get_patch(tiny_clip) is None
    for k, v in tiny_clip.state_dict().items():
        assert torch.equal(v, state[k])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny_clip.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny_vfm.modules())


def test_double_patch_is_refused(tiny_clip: nn.Module, tiny_vfm: nn.Module) -> None:
    with cp.patch_clip(tiny_clip, vfm=tiny_vfm):
        with pytest.raises(RuntimeError, match="already patched"):
            cp.patch_clip(tiny_clip, vfm=tiny_vfm)
    cp.patch_clip(tiny_clip, vfm=tiny_vfm).remove()  # fine again after removal


def test_non_vit_and_missing_vfm_are_refused(tiny_clip: nn.Module) -> None:
    with pytest.raises(TypeError, match="Supported"):
        cp.patch_clip(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match="needs a VFM"):
        cp.patch_clip(tiny_clip)
    with cp.patch_clip(tiny_clip, spectral=False) as handle:  # NACLIP-reduced + ω without a VFM
        assert handle.spectral is None and handle.last_matching == []


def test_config_errors_name_the_problem(tiny_clip: nn.Module, tiny_vfm: nn.Module) -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        cp.patch_clip(tiny_clip, tiny_vfm, preset="cass-nope")
    with pytest.raises(ValueError, match="unknown configuration key"):
        cp.patch_clip(tiny_clip, tiny_vfm, lowrnak="exact")
    with pytest.raises(ValueError, match="lowrank"):
        cp.patch_clip(tiny_clip, tiny_vfm, lowrank="svd")
    with pytest.raises(ValueError, match="unknown component"):
        cp.patch_clip(tiny_clip, tiny_vfm, components=["spectral", "magic"])
    with pytest.raises(ValueError, match="unknown baseline"):
        cp.patch_clip(tiny_clip, tiny_vfm, baseline="nope")
    assert cp.get_patch(tiny_clip) is None  # nothing left behind by failed calls


def test_presets_follow_spec_table() -> None:
    """cass.md §6 and §7 as configurations."""
    off = cp.resolve_config("cass-official")
    paper = cp.resolve_config("cass-paper")
    assert (off.gaussian_std, off.lowrank, off.rank, off.fusion_lambda, off.pairing) == (5.0, "randomized", 10, 10.0, "official")
    assert (paper.gaussian_std, paper.lowrank, paper.fusion_lambda, paper.pairing) == (None, "energy", 1.0, "paper")
    assert off.eigenscaling and paper.eigenscaling and not off.include_cls
    voc20 = cp.resolve_config("cass-official", "voc20")
    assert not voc20.eigenscaling and (voc20.gamma, voc20.alpha) == (0.4, 0.02)
    assert cp.resolve_config("cass-paper", "voc20").eigenscaling
    city = cp.resolve_config("cass-official", "cityscapes")
    assert (city.short_side, city.prior_source, city.h_threshold) == (560, "crop", 0.14)
    assert cp.resolve_config("cass-official", "voc21").mode == "whole"
    assert '"fusion_lambda": 10.0' in off.describe()


def test_components_toggle_config(tiny_clip: nn.Module, tiny_vfm: nn.Module) -> None:
    with cp.patch_clip(tiny_clip, tiny_vfm, components=["spectral"]) as h:
        assert h.config.spectral and not h.config.presence_prior and not h.config.ota
    with cp.patch_clip(tiny_clip, tiny_vfm, components=["ops", "ota"]) as h:
        assert not h.config.spectral and h.spectral is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_models_work(dtype: torch.dtype) -> None:
    model32 = ALL_CLIPS["open_clip"]()
    vfm32 = make_tiny_vfm()
    x = torch.randn(1, 3, 64, 96)
    matching = (0, 1, 2, 3)  # same assignment on both sides (ties may resolve differently in low precision)
    with torch.no_grad(), cp.patch_clip(model32, vfm32, matching=matching, lowrank="exact"):
        ref = cp.encode_dense(model32, x).features
    model, vfm = model32.to(dtype), vfm32.to(dtype)
    with torch.no_grad(), cp.patch_clip(model, vfm, matching=matching, lowrank="exact") as handle:
        out = cp.encode_dense(model, x.to(dtype)).features
    assert out.dtype == dtype and torch.isfinite(out).all()
    cos = torch.nn.functional.cosine_similarity(out.float(), ref, dim=-1)
    assert cos.min() > 0.97
    assert handle.config.matching == matching


def test_last_matching_is_exposed_per_image(tiny_clip: nn.Module, tiny_vfm: nn.Module) -> None:
    with torch.no_grad(), cp.patch_clip(tiny_clip, tiny_vfm) as handle:
        cp.encode_dense(tiny_clip, torch.randn(3, 3, 64, 64))
        matchings = handle.last_matching
    assert len(matchings) == 3
    for m in matchings:
        assert m.cost.shape == (4, 4) and sorted(m.assignment.tolist()) == [0, 1, 2, 3]
        assert m.weights.shape == (4,) and m.margin >= 0 and m.ranks is not None


def test_explicit_assignment_is_honoured(tiny_clip: nn.Module, tiny_vfm: nn.Module) -> None:
    with torch.no_grad(), cp.patch_clip(tiny_clip, tiny_vfm, matching=[3, 2, 1, 0]) as handle:
        cp.encode_dense(tiny_clip, torch.randn(2, 3, 64, 64))
        assert all(m.assignment.tolist() == [3, 2, 1, 0] for m in handle.last_matching)


def test_image_embedding_is_the_unpatched_one(tiny_clip: nn.Module, tiny_vfm: nn.Module) -> None:
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ref = cp.image_embedding(tiny_clip, x)
        with cp.patch_clip(tiny_clip, tiny_vfm) as handle:
            calls = []
            handle.vfm.handle.remove()
            handle.vfm.handle = handle.vfm.access.last_block.register_forward_pre_hook(
                lambda m, a: calls.append(1) or handle.vfm._capture(m, a))
            assert torch.equal(cp.image_embedding(tiny_clip, x), ref)
            assert calls == []  # the bypassed pass never runs the VFM


class _ScaleGraphs:
    """A third-party component: halves every attention graph."""

    @hookimpl
    def cass_refine_graphs(self, ctx) -> None:  # noqa: ANN001
        ctx.graphs = [g * 0.5 for g in ctx.graphs]


def test_third_party_component_plugin_changes_output(tiny_clip: nn.Module) -> None:
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with cp.patch_clip(tiny_clip, spectral=False, gaussian_std=None, attn="kk") as h:
            base = cp.encode_dense(tiny_clip, x).features
        with cp.patch_clip(tiny_clip, spectral=False, gaussian_std=None, attn="kk", plugins=[_ScaleGraphs()]) as h:
            scaled = cp.encode_dense(tiny_clip, x).features
            assert "user-0" in [h.pm.get_name(p) for p in h.pm.get_plugins()]
    assert not torch.allclose(base, scaled)


def test_spectral_hook_attach_shorthand(tiny_clip: nn.Module, tiny_vfm: nn.Module) -> None:
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with cp.patch_clip(tiny_clip, tiny_vfm, components=["spectral"]):
            ref = cp.encode_dense(tiny_clip, x).features
        with cp.SpectralAttentionHook.attach(tiny_clip, tiny_vfm) as handle:
            assert handle.spectral is not None and not handle.config.presence_prior and not handle.config.ota
            assert torch.equal(cp.encode_dense(tiny_clip, x).features, ref)
    assert cp.get_patch(tiny_clip) is None
