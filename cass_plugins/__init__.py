"""cass_plugins: training-free open-vocabulary semantic segmentation (CASS and friends) for any CLIP ViT.

The flat public API::

    handle = patch_clip(clip_model, vfm=dino)            # CASS last block (preset "cass-official")
    dense = encode_dense(clip_model, crops)              # (B, gh, gw, d) features + (B, d) image embeddings
    logits = handle.logits(crops, text, image=whole)     # text side: OTA, cosine logits, presence prior
    handle.remove()                                      # bit-identical unpatched model again
"""
from cass_plugins.backbone.access import ViTAccess, vit_access
from cass_plugins.backbone.loading import WeightsUnavailableError, load_clip, load_vfm
from cass_plugins.backbone.sam import SamBackbone, load_sam
from cass_plugins.cass.distillation import SpectralAttentionHook, SpectralConfig
from cass_plugins.cass.matching import HeadMatching, match_heads
from cass_plugins.cass.ota import OTAConfig, TextEmbeddingAdjuster
from cass_plugins.cass.prior import PresencePriorConfig, PresencePriorHead
from cass_plugins.core.baseline import Baseline, BlockSettings
from cass_plugins.core.config import Config, PipelineConfig, list_presets, resolve_config
from cass_plugins.core.hookspecs import hookimpl, hookspec
from cass_plugins.core.patch import (
    DenseOutput, DenseTokens, PatchHandle, cosine_logits, cosine_prior, encode_dense, encode_tokens, get_patch,
    image_embedding, patch_clip,
)
from cass_plugins.core.registry import REGISTRY, ComponentSpec, Preset
from cass_plugins.core.settings import SettingError, Settings, setting
from cass_plugins.core.vfm import VFMRunner
from cass_plugins.pipeline.segmenter import SegmentationResult, Segmenter
from cass_plugins.pipeline.vocabulary import Vocabulary
from cass_plugins.trident.affinity import sam_affinity
from cass_plugins.trident.plugin import SamAggregate, SamAggregateConfig, SamRefine
from cass_plugins.video.segment import VideoFrameResult, segment_video

__version__ = "0.2.0"

__all__ = [
    "patch_clip", "PatchHandle", "encode_dense", "DenseOutput", "image_embedding", "get_patch", "cosine_logits", "cosine_prior",
    "SpectralAttentionHook", "SpectralConfig", "VFMRunner", "HeadMatching", "match_heads", "ViTAccess", "vit_access",
    "Config", "PipelineConfig", "resolve_config", "list_presets", "REGISTRY", "ComponentSpec", "Preset",
    "Baseline", "BlockSettings", "Settings", "setting", "SettingError", "hookimpl", "hookspec",
    "PresencePriorHead", "PresencePriorConfig", "TextEmbeddingAdjuster", "OTAConfig", "Segmenter",
    "SegmentationResult", "Vocabulary", "load_clip", "load_vfm", "WeightsUnavailableError",
    "encode_tokens", "DenseTokens", "load_sam", "SamBackbone", "sam_affinity", "SamAggregate", "SamAggregateConfig",
    "SamRefine", "segment_video", "VideoFrameResult",
]
