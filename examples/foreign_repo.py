"""Add CASS to a model from a research codebase that forks OpenAI's ``clip`` (SCLIP, NACLIP, ClearCLIP, ...).

Such repositories keep OpenAI's module layout: ``visual.conv1``, ``class_embedding``, ``positional_embedding``,
``ln_pre``, ``transformer.resblocks`` (sequence-first ``nn.MultiheadAttention`` blocks), ``ln_post``, ``proj``, and
compute dense features with their own code. One ``patch_clip`` call installs forward hooks on that model; the
repository's own feature code then returns CASS features without any change, and ``handle.remove()`` gives the
original model back.

CASS's text-side components (the presence prior OPS and the text adjustment OTA) act on the logits, which such a
repository computes itself. ``handle.logits(crops, text, image=whole)`` gives them: the repository passes its own
class embeddings and, for every window, the whole image it was cut from (the same tensor, so the prior is computed
once per image) — see :func:`sliding_window_logits`.

The model below is a small random-weight copy of that structure so the example runs anywhere in seconds::

    python examples/foreign_repo.py

With real weights, replace ``make_repo_model()`` by the repository's loader (e.g. ``clip.load("ViT-B/16")[0]``) and
the VFM by ``timm.create_model("vit_base_patch8_224.dino", pretrained=True)``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from cass_plugins import PatchHandle, encode_dense, patch_clip


# ----------------------------------------------------------------------- the research repository's model (OpenAI-style)
class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)  # sequence-first: (T, B, D)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(4 * width, width)),
        ]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self, resolution: int = 224, patch: int = 16, width: int = 128, layers: int = 3, heads: int = 4,
                 output_dim: int = 64) -> None:
        super().__init__()
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((resolution // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))


class CLIP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = VisionTransformer()


def make_repo_model() -> CLIP:
    torch.manual_seed(0)
    return CLIP().eval()


def repo_dense_features(model: CLIP, images: torch.Tensor) -> torch.Tensor:
    """The repository's own dense-feature code (unchanged by CASS): every token through ln_post and proj."""
    v = model.visual
    x = v.conv1(images).flatten(2).permute(0, 2, 1)
    cls = v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1) + v.positional_embedding
    x = v.ln_pre(x).permute(1, 0, 2)  # NLD -> LND, as OpenAI's code does
    x = v.transformer(x).permute(1, 0, 2)
    feats = v.ln_post(x[:, 1:]) @ v.proj  # drop CLS
    return feats / feats.norm(dim=-1, keepdim=True)


def sliding_window_logits(
    handle: PatchHandle, image: torch.Tensor, text: torch.Tensor, crop: int = 224, stride: int = 112
) -> list[tuple[tuple[int, int, int, int], torch.Tensor]]:
    """A foreign repository's sliding-window loop with CASS's spectral + OPS + OTA.

    Args:
        handle: the patch (``components=["spectral", "ops", "ota"]``).
        image: ``(1, 3, H, W)`` the whole CLIP-normalised image.
        text: ``(Q, d)`` the repository's class embeddings.

    Returns:
        ``(window, logits (1, Q, gh, gw))`` for every window; the repository accumulates them as it always did.
    """
    from cass_plugins.pipeline.windows import window_grid

    out = []
    for y1, y2, x1, x2 in window_grid(image.shape[-2], image.shape[-1], crop, stride):
        window = image[:, :, y1:y2, x1:x2]
        # image=: the same whole-image tensor for every window -> its presence prior is computed once
        out.append(((y1, y2, x1, x2), handle.logits(window, text, image=image, windows=[(y1, y2, x1, x2)])))
    return out


def make_vfm() -> nn.Module:
    """A small random DINO-like ViT (timm); use timm.create_model('vit_base_patch8_224.dino', pretrained=True)."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(1)
    return TimmViT(img_size=224, patch_size=16, embed_dim=96, depth=2, num_heads=4, num_classes=0).eval()


def main() -> None:
    model, vfm = make_repo_model(), make_vfm()
    images = torch.randn(1, 3, 224, 224)  # CLIP-normalised crops

    with torch.no_grad():
        before = repo_dense_features(model, images)

        # The one call: NACLIP's last block + CASS's spectral distillation (OPS/OTA act on the text side: see Segmenter).
        handle = patch_clip(model, vfm, baseline="naclip", components=["spectral"])
        cass = repo_dense_features(model, images)  # the repository's code, now with CASS features
        ours = encode_dense(model, images).features.flatten(1, 2)  # the library's reader agrees
        matching = handle.last_matching[0]
        print(f"patched: {handle!r}")
        handle.remove()

        after = repo_dense_features(model, images)

    ours = ours / ours.norm(dim=-1, keepdim=True)
    print(f"CLIP head -> VFM head: {matching.assignment.tolist()}, fusion weights {matching.weights.numpy().round(3)}")
    print(f"repo features changed by CASS: mean |Δ| = {(cass - before).abs().mean():.4f}")
    print(f"repo features == encode_dense features: {torch.allclose(cass, ours, atol=1e-5)}")
    print(f"after remove(), bit-identical to the original model: {torch.equal(after, before)}")

    # OPS and OTA too: the repository's own class embeddings (random here) and its sliding-window loop.
    whole = torch.randn(1, 3, 224, 448)
    text = torch.nn.functional.normalize(torch.randn(5, 64), dim=-1)
    with torch.no_grad(), patch_clip(model, vfm, baseline="naclip", components=["spectral", "ops", "ota"]) as handle:
        windows = sliding_window_logits(handle, whole, text)
        clusters = handle.image_record.get("ota_clusters")
    print(f"spectral + OPS + OTA: {len(windows)} windows of logits {tuple(windows[0][1].shape)}; OTA clusters {clusters}")

    # Any other baseline the repository's paper compares with is one argument away:
    with torch.no_grad():
        for baseline in ("sclip", "clearclip", "vanilla"):
            with patch_clip(model, vfm, baseline=baseline, components=["spectral"]):
                delta = (repo_dense_features(model, images) - before).abs().mean()
                print(f"{baseline:>9} + CASS spectral: mean |Δ| vs the original model = {delta:.4f}")


if __name__ == "__main__":
    main()
