"""load_clip / load_vfm on bad checkpoint files: one clear CheckpointError each, and the QuickGELU switch."""
from __future__ import annotations

import argparse
import logging

import pytest
import torch

from cass_plugins.backbone.loading import CheckpointError, describe_vit, load_clip, load_vfm, read_checkpoint
from conftest import TINY_CLIP, TINY_CLIP_CFG, _register_tiny_clip, make_tiny_clip, make_tiny_vfm

GELU_NAME = "cass-tiny-gelu"


def _register_gelu_pair() -> None:
    """A plain-GELU tiny config and its ``-quickgelu`` twin, as open_clip has ViT-B-16 / ViT-B-16-quickgelu."""
    from open_clip.factory import _MODEL_CONFIGS

    _MODEL_CONFIGS[GELU_NAME] = {**TINY_CLIP_CFG, "quick_gelu": False}
    _MODEL_CONFIGS[f"{GELU_NAME}-quickgelu"] = {**TINY_CLIP_CFG, "quick_gelu": True}


def _uses_quickgelu(model: torch.nn.Module) -> bool:
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


@pytest.fixture
def clip_file(tmp_path):
    _register_tiny_clip()
    path = tmp_path / "clip.pth"
    torch.save(make_tiny_clip(seed=4).state_dict(), path)
    return path


def test_local_clip_file_loads_its_weights(clip_file):
    model, _ = load_clip(TINY_CLIP, clip_file)
    expected = torch.load(clip_file, weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_dino_checkpoint_as_clip_is_named(tmp_path):
    _register_tiny_clip()
    path = tmp_path / "dino.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in make_tiny_vfm().state_dict().items()}}, path)
    with pytest.raises(CheckpointError, match="looks like a timm/DINO ViT checkpoint; pass it as --vfm-weights"):
        load_clip(TINY_CLIP, path)


def test_clip_checkpoint_as_vfm_is_named(clip_file):
    with pytest.raises(CheckpointError, match="looks like a CLIP checkpoint.*--pretrained"):
        load_vfm("vit_tiny_patch16_224", clip_file)


def test_vfm_of_another_architecture_names_what_it_looks_like(tmp_path):
    # the shapes of a ViT-B/8 (patch 8, width 768, 12 blocks); tiny tensors elsewhere keep the file small
    state = {"patch_embed.proj.weight": torch.zeros(768, 3, 8, 8), "cls_token": torch.zeros(1, 1, 768)}
    for b in range(12):
        state[f"blocks.{b}.norm1.weight"] = torch.zeros(768)
    path = tmp_path / "vitb8.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_vfm("vit_tiny_patch16_224", path)
    text = str(info.value)
    assert "does not fit --vfm vit_tiny_patch16_224" in text
    assert "patch 8, width 768, depth 12 (looks like vit_base_patch8_224)" in text
    assert "\n" not in text


def test_describe_vit_dinov2_with_registers():
    state = {"patch_embed.proj.weight": torch.zeros(384, 3, 14, 14), "reg_token": torch.zeros(1, 4, 384),
             **{f"blocks.{b}.x": torch.zeros(1) for b in range(12)}}
    assert describe_vit(state) == "patch 14, width 384, depth 12 (looks like vit_small_patch14_reg4_dinov2)"


def test_tiny_vfm_checkpoint_loads_into_a_matching_timm_model(tmp_path):
    import timm

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path / "vit_tiny.pth"
    torch.save({"model": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    model = load_vfm("vit_tiny_patch16_224", path)
    for name, value in model.state_dict().items():
        assert torch.equal(value, ref.state_dict()[name]), name


@pytest.mark.parametrize("cut", [0.5, 0.01])
def test_truncated_checkpoint(clip_file, cut):
    data = clip_file.read_bytes()
    clip_file.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match="is truncated or corrupt"):
        load_clip(TINY_CLIP, clip_file)
    with pytest.raises(CheckpointError, match="is truncated or corrupt"):
        load_vfm("vit_tiny_patch16_224", clip_file)


def test_pickled_objects_are_refused_for_safety(tmp_path):
    path = tmp_path / "full_checkpoint.pth"
    torch.save({"model": make_tiny_vfm().state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    text = str(info.value)
    assert "arbitrary Python objects" in text and "refused for safety" in text
    assert "weights_only=False" not in text


def test_torchscript_file_is_explained(tmp_path):
    import warnings

    _register_tiny_clip()
    path = tmp_path / "ViT-B-16.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(CheckpointError) as info:
        load_clip(TINY_CLIP, path)
    text = str(info.value)
    assert "TorchScript" in text and "--pretrained openai" in text and "state dict" in text


@pytest.mark.parametrize("name", ["RN50", "RN101-quickgelu"])
def test_resnet_clip_is_refused_before_loading(name, monkeypatch):
    import open_clip

    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(ValueError, match="not a Vision Transformer.*a ViT is required"):
        load_clip(name, "random")


def test_resnet_vfm_is_refused():
    with pytest.raises(ValueError, match="not a Vision Transformer.*a ViT is required"):
        load_vfm("resnet18", "random")


def test_openai_checkpoint_switches_to_quickgelu(tmp_path, caplog):
    _register_gelu_pair()
    torch.manual_seed(0)
    import open_clip

    source = open_clip.create_model(f"{GELU_NAME}-quickgelu", pretrained=None)
    state = dict(source.state_dict())
    state.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "clip_export.pth"  # nothing in the name: the OpenAI export keys tell
    torch.save(state, path)
    assert not _uses_quickgelu(open_clip.create_model(GELU_NAME, pretrained=None))
    with caplog.at_level(logging.INFO, logger="cass_plugins.backbone.loading"):
        model, _ = load_clip(GELU_NAME, path)
    assert _uses_quickgelu(model)
    assert f"using {GELU_NAME}-quickgelu" in caplog.text
    # the same weights under an open_clip (LAION-style) file name stay plain GELU: layout alone does not tell
    plain = tmp_path / "laion.pth"
    torch.save(source.state_dict(), plain)
    assert not _uses_quickgelu(load_clip(GELU_NAME, plain)[0])
    # 'openai' in the path (the Hugging Face cache folder of the openai weights) tells too
    cached = tmp_path / "models--timm--vit_base_patch16_clip_224.openai"
    cached.mkdir()
    torch.save(source.state_dict(), cached / "open_clip_pytorch_model.bin")
    assert _uses_quickgelu(load_clip(GELU_NAME, cached / "open_clip_pytorch_model.bin")[0])


def test_clip_checkpoint_of_another_size(tmp_path):
    _register_gelu_pair()
    from open_clip.factory import _MODEL_CONFIGS
    import open_clip

    _MODEL_CONFIGS["cass-tiny-p8"] = {**TINY_CLIP_CFG, "vision_cfg": {**TINY_CLIP_CFG["vision_cfg"], "patch_size": 8}}
    path = tmp_path / "p8.pth"
    torch.save(open_clip.create_model("cass-tiny-p8", pretrained=None).state_dict(), path)
    with pytest.raises(CheckpointError, match=f"does not fit --clip {GELU_NAME}: the file has patch 8, width 64"):
        load_clip(GELU_NAME, path)


def test_offline_error_names_both_flags_and_random(monkeypatch):
    import open_clip

    def no_network(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(open_clip, "create_model", no_network)
    from cass_plugins.backbone.loading import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError) as info:
        load_clip("ViT-B-16", "openai")
    text = str(info.value)
    assert "--pretrained /path/to/checkpoint" in text and "--vfm-weights /path/to/file" in text
    assert "'random'" in text and ".pt " not in text
