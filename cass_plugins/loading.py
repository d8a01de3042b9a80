"""Model loading: open_clip CLIP models and timm VFMs by name + pretrained tag or local checkpoint file.

Weights are downloaded by open_clip / timm when a tag is given; offline, the error says exactly which file to pass.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["load_clip", "load_vfm", "WeightsUnavailableError", "RANDOM_WEIGHTS", "DEFAULT_CLIP", "DEFAULT_VFM"]

#: Values of ``pretrained`` / ``weights`` that ask for random initialisation (tests, benchmarks).
RANDOM_WEIGHTS = ("random", "none", "")
DEFAULT_CLIP = ("ViT-B-16", "openai")
DEFAULT_VFM = "vit_base_patch8_224.dino"

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained (typically: no internet). The message names the file to pass."""


def _is_file(value: str | os.PathLike | None) -> bool:
    return value is not None and Path(value).expanduser().is_file()


def _looks_like_path(value: str) -> bool:
    return any(s in value for s in ("/", "\\")) or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the weights host answers; checked first so an offline machine fails in seconds, not minutes."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class _OfflineHub:
    """Let huggingface_hub serve cached files only (no retries against an unreachable host)."""

    def __enter__(self) -> None:
        import huggingface_hub.constants as hub

        self.hub, self.prev = hub, hub.HF_HUB_OFFLINE
        if not self.prev and not _hub_reachable():
            hub.HF_HUB_OFFLINE = True  # read at call time by the download functions

    def __exit__(self, *exc: object) -> None:
        self.hub.HF_HUB_OFFLINE = self.prev


def _dtype(precision: str) -> torch.dtype:
    if precision not in _PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {sorted(_PRECISIONS)}")
    return _PRECISIONS[precision]


def _strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    for key in ("state_dict", "model", "teacher", "module"):
        if isinstance(state.get(key), dict):
            state = state[key]
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone.", "visual.trunk."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_clip(
    name: str = DEFAULT_CLIP[0],
    pretrained: str | os.PathLike | None = DEFAULT_CLIP[1],
    *,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    """Create an open_clip model and its tokenizer.

    Args:
        name: open_clip model name (``"ViT-B-16"``, ``"ViT-B-16-quickgelu"``, ``"ViT-L-14"``...; OpenAI-style
            ``"ViT-B/16"`` is accepted).
        pretrained: an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``...), a local checkpoint
            file, or ``"random"`` for random weights.
        device: where to put the model.
        precision: ``"fp32"`` (default), ``"fp16"`` or ``"bf16"``.

    Raises:
        ValueError: unknown model name or pretrained tag (with the valid choices).
        FileNotFoundError: ``pretrained`` looks like a path but no file is there.
        WeightsUnavailableError: the tag's weights cannot be downloaded (offline): pass a local file instead.
    """
    import open_clip

    name = name.replace("/", "-")
    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if name.lower().split("-")[0] in m.lower()][:10]
        raise ValueError(f"unknown open_clip model {name!r}; e.g. {close or open_clip.list_models()[:10]}")
    tag = None if pretrained is None else str(pretrained)
    kwargs: dict[str, Any] = {"precision": precision, "device": device or "cpu"}
    _dtype(precision)
    if tag is None or tag.lower() in RANDOM_WEIGHTS:
        model = open_clip.create_model(name, pretrained=None, **kwargs)
        log.warning("CLIP %s has RANDOM weights (pretrained=%r): outputs are meaningless", name, pretrained)
    elif _is_file(tag):
        model = open_clip.create_model(name, pretrained=str(Path(tag).expanduser()), **kwargs)
    elif _looks_like_path(tag):
        raise FileNotFoundError(f"CLIP checkpoint file not found: {tag}")
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if tag not in tags:
            raise ValueError(f"{name!r} has no pretrained tag {tag!r}; available: {tags} (or pass a checkpoint file)")
        try:
            with _OfflineHub():
                model = open_clip.create_model(name, pretrained=tag, **kwargs)
        except Exception as err:  # network errors come from several libraries (urllib, requests, huggingface_hub)
            raise WeightsUnavailableError(
                f"could not obtain open_clip weights {name}/{tag} ({type(err).__name__}: {err}). If this machine is "
                f"offline, download them where there is internet (open_clip.create_model({name!r}, "
                f"pretrained={tag!r}) caches the file under ~/.cache/huggingface or ~/.cache/clip) and pass the "
                f"file: --pretrained /path/to/checkpoint (or load_clip({name!r}, '/path/to/checkpoint'))"
            ) from err
    return model.eval(), open_clip.get_tokenizer(name)


def load_vfm(
    name: str = DEFAULT_VFM,
    weights: str | os.PathLike | None = "pretrained",
    *,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> nn.Module:
    """Create a timm ViT to serve as the vision foundation model.

    Args:
        name: timm model name, e.g. ``"vit_base_patch8_224.dino"`` (CASS default), ``"vit_base_patch16_224.dino"``,
            ``"vit_small_patch8_224.dino"``, ``"vit_base_patch14_reg4_dinov2.lvd142m"``.
        weights: ``"pretrained"`` (download through timm), a local checkpoint file (timm or original DINO
            format; ``module.``/``backbone.`` prefixes and ``teacher`` wrappers are handled), or ``"random"``.
        device: where to put the model.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``.

    Raises:
        ValueError: unknown timm model name.
        FileNotFoundError / WeightsUnavailableError: as :func:`load_clip`.
    """
    import timm

    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {name!r}; e.g. {timm.list_models('*dino*')[:10]}")
    w = None if weights is None else str(weights)
    if w is not None and w.lower() == "pretrained":
        try:
            with _OfflineHub():
                model = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as err:
            raise WeightsUnavailableError(
                f"could not obtain timm weights for {name} ({type(err).__name__}: {err}). If this machine is "
                f"offline, download them where there is internet (timm.create_model({name!r}, pretrained=True) "
                "caches them under ~/.cache/huggingface) or use the original DINO checkpoint "
                "(e.g. dino_vitbase8_pretrain.pth), and pass the file: --vfm-weights /path/to/file"
            ) from err
    else:
        model = timm.create_model(name, pretrained=False, num_classes=0)
        if w is None or w.lower() in RANDOM_WEIGHTS:
            log.warning("VFM %s has RANDOM weights: outputs are meaningless", name)
        elif _is_file(w):
            state = torch.load(Path(w).expanduser(), map_location="cpu", weights_only=True)
            state = _strip_prefixes(state)
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("head.")]
            if missing:
                raise ValueError(f"{w} does not fit {name}: missing {missing[:8]}{'...' if len(missing) > 8 else ''}")
            if unexpected:
                log.info("ignored %d unexpected keys in %s (e.g. %s)", len(unexpected), w, unexpected[:3])
        else:
            raise FileNotFoundError(f"VFM checkpoint file not found: {w}")
    return model.to(device=device or "cpu", dtype=_dtype(precision)).eval()
