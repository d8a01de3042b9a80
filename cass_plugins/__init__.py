"""cass_plugins: training-free open-vocabulary semantic segmentation (CASS and friends) for any CLIP ViT.

The flat public API::

    handle = patch_clip(clip_model, vfm=dino)            # CASS last block (preset "cass-official")
    dense = encode_dense(clip_model, crops)              # (B, gh, gw, d) features + (B, d) image embeddings
    handle.remove()                                      # bit-identical unpatched model again
"""
from .backbone import ViTAccess, vit_access
from .hooks import SpectralAttentionHook, VFMRunner
from .loading import WeightsUnavailableError, load_clip, load_vfm
from .matching import HeadMatching, match_heads
from .patch import COMPONENTS, DenseOutput, PatchHandle, encode_dense, get_patch, image_embedding, patch_clip
from .plugins import REGISTRY, hookimpl, hookspec
from .presets import Config, list_presets, resolve_config
from .prior import PresencePriorHead
from .ota import TextEmbeddingAdjuster
from .segmenter import SegmentationResult, Segmenter
from .vocabulary import Vocabulary

__version__ = "0.1.0"

__all__ = [
    "patch_clip", "PatchHandle", "encode_dense", "DenseOutput", "image_embedding", "get_patch", "COMPONENTS",
    "SpectralAttentionHook", "VFMRunner", "HeadMatching", "match_heads", "ViTAccess", "vit_access",
    "Config", "resolve_config", "list_presets", "REGISTRY", "hookimpl", "hookspec",
    "PresencePriorHead", "TextEmbeddingAdjuster", "Segmenter", "SegmentationResult", "Vocabulary",
    "load_clip", "load_vfm", "WeightsUnavailableError",
]
