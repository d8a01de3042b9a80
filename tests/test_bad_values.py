"""Bad values, reported with their cause.

1. NaN/inf arising inside the patched forward (a NaN weight in CLIP or in the VFM, activations that overflow) is
   reported by ``encode_dense`` and by ``Segmenter.segment`` as a FloatingPointError naming the model whose
   parameters are non-finite, or the overflow: never a bare solver error, never silent NaN features.
2. Configuration values are refused before any model is built or patched, through ``resolve_config``,
   ``patch_clip`` and ``cass-segment --print-config --set``, each message naming the key (the CLI exits with 2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import make_tiny_clip, make_tiny_vfm

import cass_plugins
from cass_plugins import encode_dense, patch_clip
from cass_plugins.cli import segment as segment_cli
from cass_plugins.core import patch as patch_module
from cass_plugins.core.config import parse_overrides
from cass_plugins.core.patch import get_patch
from cass_plugins.core.registry import ComponentSpec, Registry
from cass_plugins.core.settings import SettingError, Settings, setting
from cass_plugins.pipeline.segmenter import Segmenter

VOCAB = "cat; dog; sky"
SMALL = dict(short_side=64, crop=64, stride=32)  # a few 64-pixel windows keep the tiny models fast


def _crops(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 64, 64, generator=g)


def _image(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, 80, 96, generator=g)  # (3, H, W) in [0, 1]


def _poison(model: torch.nn.Module, name: str, value: float = math.nan) -> None:
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[0] = value


CLIP_WEIGHT = "visual.transformer.resblocks.0.attn.in_proj_weight"
VFM_WEIGHT = "blocks.0.attn.qkv.weight"


# --------------------------------------------------------------------------------- NaN/inf inside the forward
@pytest.mark.parametrize("preset", ["cass-official", "naclip", "proxyclip"])
def test_nan_clip_weight_named_by_encode_dense(preset: str) -> None:
    clip, vfm = make_tiny_clip(), make_tiny_vfm()
    _poison(clip, CLIP_WEIGHT)
    with patch_clip(clip, vfm, preset=preset), torch.no_grad():
        with pytest.raises(FloatingPointError, match="NaN or inf") as info:
            encode_dense(clip, _crops())
    assert "CLIP parameters" in str(info.value) and CLIP_WEIGHT in str(info.value)
    assert "VFM parameters" not in str(info.value)


@pytest.mark.parametrize("preset", ["cass-official", "proxyclip"])  # the presets whose forward runs the VFM
def test_nan_vfm_weight_named_by_encode_dense(preset: str) -> None:
    clip, vfm = make_tiny_clip(), make_tiny_vfm()
    _poison(vfm, VFM_WEIGHT)
    with patch_clip(clip, vfm, preset=preset), torch.no_grad():
        # Without the diagnosis, cass-official fails in eigh (LinAlgError) and proxyclip returns NaN features.
        with pytest.raises(FloatingPointError, match="NaN or inf") as info:
            encode_dense(clip, _crops())
    assert "VFM parameters" in str(info.value) and VFM_WEIGHT in str(info.value)
    assert "CLIP parameters" not in str(info.value)


def test_nan_weight_of_the_cls_path_only_is_not_silent() -> None:
    # NACLIP's last block skips the MLP for the patches: a NaN there leaves the features finite but the image
    # embedding (CLS) NaN, which must not be returned silently either.
    clip = make_tiny_clip()
    _poison(clip, "visual.transformer.resblocks.1.mlp.c_fc.weight")
    with patch_clip(clip, preset="naclip", spectral=False), torch.no_grad():
        with pytest.raises(FloatingPointError, match="image embedding.*resblocks.1.mlp.c_fc.weight"):
            encode_dense(clip, _crops())


def test_nan_weight_in_an_unpatched_model() -> None:
    clip = make_tiny_clip()
    _poison(clip, "visual.ln_post.weight")
    with torch.no_grad(), pytest.raises(FloatingPointError, match="CLIP patch features.*ln_post"):
        encode_dense(clip, _crops())


@pytest.mark.parametrize("model_name", ["CLIP", "VFM"])
def test_activation_overflow_named_when_weights_are_finite(model_name: str) -> None:
    # Finite but huge patch-embedding weights overflow the activations (what fp16 does to large activations).
    clip, vfm = make_tiny_clip(), make_tiny_vfm()
    with torch.no_grad():
        if model_name == "CLIP":
            clip.visual.conv1.weight.mul_(1e37)
        else:
            vfm.patch_embed.proj.weight.mul_(1e37)
    with patch_clip(clip, vfm, preset="cass-official"), torch.no_grad():
        with pytest.raises(FloatingPointError, match="activations overflowed") as info:
            encode_dense(clip, _crops())
    assert f"the {model_name} activations" in str(info.value)
    assert "parameters [" not in str(info.value)


def test_other_errors_pass_unchanged_and_parameters_are_scanned_only_on_failure(monkeypatch) -> None:
    calls: list[int] = []
    real = patch_module.non_finite_parameters

    def counting(clip_model: Any, vfm: Any) -> list[str]:
        calls.append(1)
        return real(clip_model, vfm)

    monkeypatch.setattr(patch_module, "non_finite_parameters", counting)
    clip, vfm = make_tiny_clip(), make_tiny_vfm()
    with patch_clip(clip, vfm, preset="cass-official"), torch.no_grad():
        out = encode_dense(clip, _crops())
    assert torch.isfinite(out.features).all() and calls == []  # a healthy forward pays no parameter scan
    with patch_clip(clip, preset="cdam-sclip"), torch.no_grad():
        with pytest.raises(RuntimeError, match="set_vocabulary"):  # not a NaN: not turned into one
            encode_dense(clip, _crops())


@pytest.mark.parametrize(("which", "name", "label"), [("clip", CLIP_WEIGHT, "CLIP parameters"),
                                                       ("vfm", VFM_WEIGHT, "VFM parameters")])
def test_nan_weights_named_by_the_segmenter(which: str, name: str, label: str) -> None:
    clip, vfm = make_tiny_clip(), make_tiny_vfm()
    _poison(clip if which == "clip" else vfm, name)
    with Segmenter(clip, vfm, vocabulary=VOCAB, **SMALL) as seg:
        with pytest.raises(FloatingPointError, match="NaN or inf") as info:
            seg.segment(_image())
    assert label in str(info.value) and name in str(info.value)


# ------------------------------------------------------------------------------------ configuration values
def _toy_registry() -> Registry:
    """A fresh registry with a section sharing the flat key ``entropy_scale`` with CDAM's (no built-in flat key is
    ambiguous: ``alpha`` of OTA and CDAM is OTA's by the legacy mapping)."""

    @dataclass(frozen=True)
    class ToyConfig(Settings):
        entropy_scale: float = setting(1.0, doc="a setting named like CDAM's")

    class Toy:
        def __init__(self, config: ToyConfig, runtime: Any = None) -> None:
            self.config = config

    registry = Registry()
    registry.load()
    registry.add_component(ComponentSpec(name="toy", config_class=ToyConfig, factory=Toy, summary="toy"))
    return registry


# (overrides for resolve_config / patch_clip, --set items, words the message must contain)
BAD = [
    pytest.param({"fusion_lambda": math.nan}, ["fusion_lambda=nan"], ["spectral.fusion_lambda", "finite"],
                 id="fusion_lambda-nan"),
    pytest.param({"spectral.fusion_lambda": math.inf}, ["spectral.fusion_lambda=inf"],
                 ["spectral.fusion_lambda", "finite"], id="spectral.fusion_lambda-inf"),
    pytest.param({"logit_scale": math.inf}, ["logit_scale=inf"], ["pipeline.logit_scale", "finite"],
                 id="logit_scale-inf"),
    pytest.param({"logit_scale": 0}, ["logit_scale=0"], ["pipeline.logit_scale", "(0, inf)"], id="logit_scale-0"),
    pytest.param({"spectrum_size": 0}, ["spectrum_size=0"], ["spectral.spectrum_size", "[1, inf]"],
                 id="spectrum_size-0"),
    pytest.param({"stride": 500, "crop": 224}, ["stride=500", "crop=224"], ["pipeline.stride", "pipeline.crop"],
                 id="stride-above-crop"),
    pytest.param({"gamma": "abc"}, ["gamma=abc"], ["ops.gamma", "number"], id="gamma-abc"),
    pytest.param({"rank": "abc"}, ["rank=abc"], ["spectral.rank", "integer"], id="rank-abc"),
    pytest.param({"lowrank": "exactt"}, ["lowrank=exactt"],
                 ["spectral.lowrank", "'randomized'", "'exact'", "'energy'", "'eigengap'"], id="lowrank-typo"),
    pytest.param({"gama": 0.1}, ["gama=0.1"], ["unknown configuration key 'gama'"], id="unknown-key"),
    pytest.param({"components": ["nope"]}, ["components=nope"], ["'nope'", "cdam", "ops", "ota", "spectral"],
                 id="unknown-component"),
    pytest.param({"baseline": "maskclip", "components": ["spectral"]}, ["baseline=maskclip"],
                 ["'spectral'", "'maskclip'"], id="spectral-on-maskclip"),
    pytest.param({"baseline": "proxyclip", "components": ["cdam"]}, ["baseline=proxyclip", "components=cdam"],
                 ["'cdam'", "'proxyclip'"], id="cdam-on-proxyclip"),
]


@pytest.mark.parametrize(("overrides", "items", "words"), BAD)
def test_resolve_config_refuses(overrides: dict[str, Any], items: list[str], words: list[str]) -> None:
    with pytest.raises(SettingError) as info:
        cass_plugins.resolve_config("cass-official", **overrides)
    message = str(info.value)
    assert all(w in message for w in words), message
    assert "image" not in message  # a configuration error, not blamed on any image


@pytest.mark.parametrize(("overrides", "items", "words"), BAD)
def test_patch_clip_refuses_before_patching(overrides: dict[str, Any], items: list[str], words: list[str]) -> None:
    clip, vfm = make_tiny_clip(), make_tiny_vfm()
    with pytest.raises(SettingError) as info:
        patch_clip(clip, vfm, preset="cass-official", **overrides)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert get_patch(clip) is None  # nothing installed


@pytest.mark.parametrize(("overrides", "items", "words"), BAD)
def test_cli_print_config_refuses_with_status_2(
    overrides: dict[str, Any], items: list[str], words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        segment_cli.main(["--print-config", "--set", *items])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no configuration printed
    err = captured.err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err


def test_flat_alpha_is_otas_and_dotted_keys_reach_cdam() -> None:
    # alpha exists in OTA and CDAM; the legacy flat key is OTA's (documented), CDAM's is addressed as cdam.alpha.
    config = cass_plugins.resolve_config("cass-official", components=["spectral", "ota", "cdam"], alpha=0.3)
    assert config["ota"].alpha == 0.3 and config["cdam"].alpha == 2.5
    config = cass_plugins.resolve_config("cass-official", **{"cdam.alpha": 1.0})
    assert config["cdam"].alpha == 1.0 and config["ota"].alpha != 1.0


def test_ambiguous_flat_key_names_every_owner() -> None:
    registry = _toy_registry()
    with pytest.raises(SettingError, match=r"'entropy_scale' is ambiguous: use one of cdam.entropy_scale, "
                                           r"toy.entropy_scale"):
        cass_plugins.resolve_config("cass-official", registry=registry, entropy_scale=5.0)
    config = cass_plugins.resolve_config("cass-official", registry=registry)
    with pytest.raises(SettingError, match="ambiguous"):
        parse_overrides(["entropy_scale=5"], config)
    assert parse_overrides(["toy.entropy_scale=5"], config) == {"toy.entropy_scale": 5.0}


def test_cli_set_baseline_before_components_is_judged_on_the_final_set(capsys: pytest.CaptureFixture[str]) -> None:
    # baseline=maskclip alone is refused (the preset's spectral needs a graph); with components=ops after it the
    # set is valid, whatever the order of the items.
    for items in (["baseline=maskclip", "components=ops"], ["components=ops", "baseline=maskclip"]):
        assert segment_cli.main(["--print-config", "--set", *items]) == 0
        out = capsys.readouterr().out
        assert '"baseline": "maskclip"' in out and '"ops"' in out
