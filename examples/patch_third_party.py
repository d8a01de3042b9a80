"""Add CASS components to a CLIP model that some other codebase built.

    python examples/patch_third_party.py                     # real weights (downloaded once)
    python examples/patch_third_party.py --random-weights    # offline (about a minute on 2 cores)

The model here comes straight from ``open_clip.create_model_and_transforms`` - the way a third-party project would
have it - and is never rebuilt or wrapped. The example

1. patches its last block with ``patch_clip`` (CASS spectral distillation from a DINO VFM) and adds a component of
   its own through the plugin hooks,
2. reads dense patch features with ``encode_dense`` and turns them into segmentation logits with the standalone
   ``TextEmbeddingAdjuster`` (OTA) and ``PresencePriorHead`` (OPS), plain tensors in, tensors out,
3. removes the patch and checks that the model's outputs are bit-identical to before.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from cass_plugins import PresencePriorHead, TextEmbeddingAdjuster, encode_dense, hookimpl, load_vfm, patch_clip
from cass_plugins.pipeline.image import clip_normalize, load_image
from cass_plugins.pipeline.text import encode_text


class GraphStatistics:
    """A third-party component: sees (and could edit) the fused attention graphs of every forward.

    Any object with ``@hookimpl`` methods named after the hook specifications in ``cass_plugins.core.hookspecs`` is a
    plugin; this one only records the range of the graphs after CASS has fused the VFM graph into them.
    """

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float]] = []

    @hookimpl(trylast=True)  # after the spectral fusion, which runs first
    def cass_refine_graphs(self, ctx) -> None:
        g = ctx.graphs[0]
        self.seen.append((g.shape[-1], float(g.min()), float(g.max())))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random-weights", action="store_true", help="random CLIP and VFM weights (no download)")
    args = p.parse_args()

    import open_clip
    from skimage import data

    # --- the third party's model, built by its own code -----------------------------------------------------------
    model, _, _ = open_clip.create_model_and_transforms(
        "ViT-B-16", pretrained=None if args.random_weights else "openai"
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    vfm = load_vfm("vit_base_patch8_224.dino", "random" if args.random_weights else "pretrained")

    image = clip_normalize(load_image(data.astronaut()))[None]  # (1, 3, 512, 512), CLIP normalisation
    crop = F.interpolate(image, size=(224, 224), mode="bilinear", align_corners=False)
    with torch.no_grad():
        before = model.encode_image(crop)

    # --- 1. patch: CASS spectral distillation + our own component -------------------------------------------------
    stats = GraphStatistics()
    handle = patch_clip(model, vfm, components=["spectral"], plugins=[stats])
    print(handle)
    classes = ["person", "flag", "sky"]
    with torch.no_grad():
        text = encode_text(model, tokenizer, classes)  # (Q, d), 80 templates each

        # --- 2. dense features → logits with the standalone heads ---------------------------------------------------
        dense = encode_dense(model, crop)  # features (1, 14, 14, 512), image_embeds (1, 512)
        prior = PresencePriorHead.prior(dense.image_embeds, text)  # (1, Q) cosine presence scores
        ota = TextEmbeddingAdjuster(alpha=0.03, h_threshold=0.1)
        adjusted = ota.adjust(dense.features, text, prior)  # (1, Q, d): one query per cluster moved
        logits = TextEmbeddingAdjuster.logits(dense.features, adjusted)  # (1, Q, 14, 14) cosines
        logits = PresencePriorHead(gamma=0.2)(logits, prior)
        labels = logits.argmax(1)[0]
        during = model.encode_image(crop)  # the image embedding is untouched by the patch (CLS keeps its output)
    print(f"dense features {tuple(dense.features.shape)}, logits {tuple(logits.shape)}")
    print("patch-level label counts:", {c: int((labels == i).sum()) for i, c in enumerate(classes)})
    m = handle.last_matching[0]
    print(f"head matching (CLIP head → VFM head): {m.assignment.tolist()}, margin {float(m.margin):.2e}")
    n, lo, hi = stats.seen[-1]
    print(f"our component saw {len(stats.seen)} forward(s); fused graphs {n}×{n}, range [{lo:.2f}, {hi:.2f}]")

    # --- 3. remove: the third party gets its model back unchanged -------------------------------------------------
    handle.remove()
    with torch.no_grad():
        after = model.encode_image(crop)
    print("image embedding unchanged while patched:", torch.allclose(during, before, atol=1e-5))
    print("bit-identical after remove():", torch.equal(after, before))
    assert torch.equal(after, before)


if __name__ == "__main__":
    main()
