"""Model loading: open_clip CLIP models and timm VFMs by name + pretrained tag or local checkpoint file.

Weights are downloaded by open_clip / timm when a tag is given; offline, the error says exactly which file to pass.
Local checkpoint files are read here with ``torch.load(weights_only=True)`` (or safetensors) and inspected before any
model sees them, so a wrong, corrupt or unsafe file gives a one-line :class:`CheckpointError` naming the problem.

QuickGELU: OpenAI's CLIP ViTs use QuickGELU activations; open_clip calls that configuration ``ViT-B-16-quickgelu``.
A local checkpoint recognisably from OpenAI (OpenAI export keys ``input_resolution``/``context_length``/
``vocab_size``, or ``openai`` in its file name, or the Hugging Face cache folder ``vit_base_patch16_clip_224.openai``)
loaded as a plain-GELU name is switched to the ``-quickgelu`` configuration automatically, with an info message.
Key names alone cannot tell: open_clip's own (LAION) ViT-B-16 checkpoints have the same layout and use plain GELU.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "load_clip", "load_vfm", "read_checkpoint", "file_sha256", "WeightsUnavailableError", "CheckpointError",
    "RANDOM_WEIGHTS", "DEFAULT_CLIP", "DEFAULT_VFM",
]

#: Values of ``pretrained`` / ``weights`` that ask for random initialisation (tests, benchmarks).
RANDOM_WEIGHTS = ("random", "none", "")
DEFAULT_CLIP = ("ViT-B-16", "openai")
DEFAULT_VFM = "vit_base_patch8_224.dino"

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Top-level entries of OpenAI's exported CLIP state dicts that are not parameters.
_OPENAI_META = ("input_resolution", "context_length", "vocab_size")
_WIDTH_NAMES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge", 1536: "giant"}
_CLIP_WIDTH_NAMES = {768: "B", 1024: "L", 1280: "H"}

OFFLINE_HINT = (
    "offline? pass local state-dict files: --pretrained /path/to/checkpoint and --vfm-weights /path/to/file "
    "(e.g. dino_vitbase8_pretrain.pth), or 'random' for both for a meaningless dry run"
)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained (typically: no internet). The message names the file to pass."""


class CheckpointError(ValueError):
    """A local checkpoint file cannot be used (wrong model, corrupt, unsafe, TorchScript); the message says why."""


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


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_torchscript(path: Path) -> bool:
    # A TorchScript archive is a zip holding compiled code (<root>/code/...) and constants.pkl; a state dict is not.
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in n for n in names) or any(n.endswith("/constants.pkl") for n in names)


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """Load a checkpoint file safely (no arbitrary Python objects) as a flat ``{key: tensor-or-value}`` dict.

    Args:
        path: a ``.safetensors`` file or a ``torch.save`` file holding a state dict (possibly wrapped).
        what: how error messages call the file (``"CLIP checkpoint"``...).

    Raises:
        CheckpointError: TorchScript archive, pickled Python objects (refused by ``weights_only=True``),
            truncated/corrupt file, or no dict of tensors inside.
    """
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as err:  # safetensors raises its own error types for bad headers / short files
            raise CheckpointError(f"{what} {path} is truncated or corrupt ({_one_line(err)})") from err
    if _is_torchscript(path):
        raise CheckpointError(
            f"{what} {path} is a TorchScript archive (like OpenAI's original .pt files), which cannot be loaded "
            "safely; use the open_clip tag instead (--pretrained openai) or convert it once to a state dict "
            "(torch.save(model.state_dict(), 'clip.pth')) on a machine where you trust the file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise CheckpointError(
                f"{what} {path} contains arbitrary Python objects besides tensors and was refused for safety; "
                "save only the state dict (torch.save(model.state_dict(), FILE)) and pass that file") from err
        raise CheckpointError(f"{what} {path} is truncated or corrupt ({_one_line(err)})") from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{what} {path} is truncated or corrupt ({_one_line(err)})") from err
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{what} {path} holds a {type(state).__name__}, not a state dict")
    for key in ("state_dict", "model", "teacher", "module"):  # training checkpoints wrap the weights
        if isinstance(state.get(key), Mapping):
            state = state[key]
    return dict(state)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


# --------------------------------------------------------------------------------------------- layout inspection
def _tensor_keys(state: Mapping[str, Any]) -> list[str]:
    return [k for k, v in state.items() if isinstance(v, torch.Tensor)]


def _is_timm_vit_layout(state: Mapping[str, Any]) -> bool:
    keys = [k.removeprefix("module.").removeprefix("backbone.") for k in _tensor_keys(state)]
    return "patch_embed.proj.weight" in keys and any(k.startswith("blocks.") for k in keys)


def _is_clip_layout(state: Mapping[str, Any]) -> bool:
    keys = _tensor_keys(state)
    return any(k.startswith("visual.") for k in keys) and (
        "token_embedding.weight" in keys or any(k.startswith(("transformer.", "text.")) for k in keys))


def describe_vit(state: Mapping[str, Any]) -> str | None:
    """``"patch 8, width 768, depth 12 (looks like vit_base_patch8_224)"`` from a timm/DINO ViT state dict."""
    state = _strip_prefixes(dict(state))
    proj = state.get("patch_embed.proj.weight")
    if not isinstance(proj, torch.Tensor) or proj.dim() != 4:
        return None
    width, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    regs = state.get("reg_token")
    size = _WIDTH_NAMES.get(width)
    guess = None
    if size is not None:
        if patch == 14:
            guess = f"vit_{size}_patch14_{'reg4_' if regs is not None else ''}dinov2"
        else:
            guess = f"vit_{size}_patch{patch}_224"
    text = f"patch {patch}, width {width}, depth {depth}"
    return f"{text} (looks like {guess})" if guess else text


def describe_clip(state: Mapping[str, Any]) -> str | None:
    """``"patch 16, width 768, depth 12 (looks like ViT-B-16)"`` from an open_clip/OpenAI CLIP state dict."""
    conv = state.get("visual.conv1.weight")
    if not isinstance(conv, torch.Tensor):
        return None
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    depth = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    size = _CLIP_WIDTH_NAMES.get(width)
    text = f"patch {patch}, width {width}, depth {depth}"
    return f"{text} (looks like ViT-{size}-{patch})" if size else text


def _is_openai_origin(state: Mapping[str, Any], path: Path) -> bool:
    # the file's own name, or a Hugging Face cache folder of the openai weights (``...clip_224.openai``)
    return (any(k in state for k in _OPENAI_META) or "openai" in path.name.lower()
            or any(part.lower().endswith(".openai") for part in path.parts))


def _check_clip_is_vit(name: str) -> None:
    import open_clip

    cfg = open_clip.get_model_config(name) or {}
    vision = cfg.get("vision_cfg", {})
    timm_name = vision.get("timm_model_name")
    if isinstance(vision.get("layers"), (list, tuple)) or (timm_name and "vit" not in str(timm_name)):
        raise ValueError(
            f"--clip {name} is not a Vision Transformer (ResNet/ConvNet towers have no attention blocks to patch); "
            "a ViT is required, e.g. --clip ViT-B-16")


def _load_clip_state(model: nn.Module, state: dict[str, Any], name: str, path: Path) -> None:
    """open_clip's checkpoint massaging on an already-read state dict, then a strict load with a clear mismatch."""
    from open_clip.factory import convert_to_custom_text_state_dict, resize_pos_embed

    state = {k.removeprefix("module."): v for k, v in state.items() if k not in _OPENAI_META}
    try:  # absent in older open_clip
        from open_clip.factory import convert_state_dict

        state = convert_state_dict(model, state)
    except ImportError:
        pass
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    if "logit_scale" in state and model.logit_scale.ndim != state["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    try:
        resize_pos_embed(state, model)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError) as err:
        found = describe_clip(state)
        raise CheckpointError(
            f"CLIP checkpoint {path} does not fit --clip {name}"
            + (f": the file has {found}" if found else f" ({_one_line(err)})")) from err


# ------------------------------------------------------------------------------------------------------ loaders
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
            ``"ViT-B/16"`` is accepted). Must be a ViT.
        pretrained: an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``...), a local state-dict
            file (``.pth``/``.bin``/``.safetensors``), or ``"random"`` for random weights. A file from OpenAI
            loaded as a plain-GELU name switches to the ``-quickgelu`` configuration (module docstring).
        device: where to put the model.
        precision: ``"fp32"`` (default), ``"fp16"`` or ``"bf16"``.

    Raises:
        ValueError: unknown model name, not a ViT, or unknown pretrained tag (with the valid choices).
        FileNotFoundError: ``pretrained`` looks like a path but no file is there.
        CheckpointError: the file cannot be used (DINO checkpoint, other architecture, corrupt, unsafe, TorchScript).
        WeightsUnavailableError: the tag's weights cannot be downloaded (offline): pass a local file instead.
    """
    import open_clip

    name = name.replace("/", "-")
    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if name.lower().split("-")[0] in m.lower()][:10]
        raise ValueError(f"unknown open_clip model {name!r}; e.g. {close or open_clip.list_models()[:10]}")
    _check_clip_is_vit(name)
    tag = None if pretrained is None else str(pretrained)
    kwargs: dict[str, Any] = {"precision": precision, "device": device or "cpu"}
    _dtype(precision)
    if tag is None or tag.lower() in RANDOM_WEIGHTS:
        model = open_clip.create_model(name, pretrained=None, **kwargs)
        log.warning("CLIP %s has RANDOM weights (pretrained=%r): outputs are meaningless", name, pretrained)
    elif _is_file(tag):
        path = Path(tag).expanduser()
        state = read_checkpoint(path, "CLIP checkpoint")
        if _is_timm_vit_layout(state) and not _is_clip_layout(state):
            raise CheckpointError(
                f"{path}: this file looks like a timm/DINO ViT checkpoint; pass it as --vfm-weights (not --pretrained)")
        if not _is_clip_layout(state):
            raise CheckpointError(f"{path} is not an open_clip/OpenAI CLIP state dict (e.g. keys {list(state)[:4]})")
        cfg = open_clip.get_model_config(name) or {}
        if _is_openai_origin(state, path) and not cfg.get("quick_gelu", False):
            if f"{name}-quickgelu" not in open_clip.list_models():
                raise CheckpointError(
                    f"{path} is an OpenAI CLIP checkpoint, which uses QuickGELU, but {name} uses GELU and has no "
                    f"-quickgelu variant; pass the matching QuickGELU model with --clip")
            log.info("%s is an OpenAI checkpoint (QuickGELU activations): using %s-quickgelu instead of %s",
                     path.name, name, name)
            name = f"{name}-quickgelu"
        model = open_clip.create_model(name, pretrained=None, **kwargs)
        _load_clip_state(model, state, name, path)
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
                f"could not obtain open_clip weights {name}/{tag} ({_one_line(err)}); {OFFLINE_HINT} "
                f"(open_clip.create_model({name!r}, pretrained={tag!r}) caches the file under ~/.cache/huggingface)"
            ) from err
    return model.eval(), open_clip.get_tokenizer(name)


def _check_vfm_is_vit(name: str) -> None:
    import timm

    with torch.device("meta"):  # no memory, no weights: only the class matters
        probe = timm.create_model(name.split(".")[0], pretrained=False, num_classes=0)
    if not (hasattr(probe, "patch_embed") and hasattr(probe, "blocks")):
        raise ValueError(
            f"--vfm {name} is not a Vision Transformer ({type(probe).__name__}); a ViT is required, "
            "e.g. --vfm vit_base_patch8_224.dino")


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
            ``"vit_small_patch8_224.dino"``, ``"vit_base_patch14_reg4_dinov2.lvd142m"``. Must be a ViT.
        weights: ``"pretrained"`` (download through timm), a local checkpoint file (timm or original DINO
            format; ``module.``/``backbone.`` prefixes and ``teacher`` wrappers are handled), or ``"random"``.
        device: where to put the model.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``.

    Raises:
        ValueError: unknown timm model name, or not a ViT.
        FileNotFoundError / CheckpointError / WeightsUnavailableError: as :func:`load_clip`.
    """
    import timm

    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {name!r}; e.g. {timm.list_models('*dino*')[:10]}")
    _check_vfm_is_vit(name)
    w = None if weights is None else str(weights)
    if w is not None and w.lower() == "pretrained":
        try:
            with _OfflineHub():
                model = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as err:
            raise WeightsUnavailableError(
                f"could not obtain timm weights for {name} ({_one_line(err)}); {OFFLINE_HINT} "
                f"(timm.create_model({name!r}, pretrained=True) caches them under ~/.cache/huggingface)"
            ) from err
    else:
        if w is not None and w.lower() not in RANDOM_WEIGHTS and not _is_file(w):
            raise FileNotFoundError(f"VFM checkpoint file not found: {w}")
        model = timm.create_model(name, pretrained=False, num_classes=0)
        if w is None or w.lower() in RANDOM_WEIGHTS:
            log.warning("VFM %s has RANDOM weights: outputs are meaningless", name)
        else:
            _load_vfm_state(model, Path(w).expanduser(), name)
    return model.to(device=device or "cpu", dtype=_dtype(precision)).eval()


def _load_vfm_state(model: nn.Module, path: Path, name: str) -> None:
    raw = read_checkpoint(path, "VFM checkpoint")
    if _is_clip_layout(raw):
        raise CheckpointError(f"{path} looks like a CLIP checkpoint, not a timm/DINO ViT; pass it as --pretrained")
    state = {k: v for k, v in _strip_prefixes(raw).items() if not k.startswith("head.")}
    expected = model.state_dict()
    wrong = [k for k, v in state.items() if k in expected and isinstance(v, torch.Tensor)
             and k != "pos_embed" and tuple(v.shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in state and not k.startswith("head.")]
    if wrong or (missing and _is_timm_vit_layout(state)):
        found = describe_vit(state) or f"different shapes, e.g. {wrong[:2]}"
        have = describe_vit(expected) or name
        raise CheckpointError(f"VFM checkpoint {path} does not fit --vfm {name} ({have}): the file has {found}")
    if missing:
        raise CheckpointError(
            f"{path} is not a timm/DINO ViT state dict for {name}: missing {missing[:4]}{'...' if len(missing) > 4 else ''}")
    if "pos_embed" in state and state["pos_embed"].shape != expected["pos_embed"].shape:
        # another training resolution: resample the grid as timm does for its own checkpoints
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(grid), num_prefix_tokens=prefix)
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        log.info("ignored %d unexpected keys in %s (e.g. %s)", len(unexpected), path, unexpected[:3])
