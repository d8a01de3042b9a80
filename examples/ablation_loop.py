"""Per-component ablation on one image: switch CASS's parts off one at a time and compare with the full model.

    python examples/ablation_loop.py photo.jpg --classes "cat; sofa; wall" --dataset context59
    python examples/ablation_loop.py --random-weights --short-side 224      # offline, about a minute on 2 cores

Each row is one ``Segmenter`` with configuration overrides (the same keys as ``cass-segment --set``); the models
are loaded once and the text embeddings are cached across rows. Printed per row: pixel agreement of the label map
with the full model, mean |Δ logits|, and the time. (The paper's Table 3 does this on whole datasets with mIoU.)
"""
from __future__ import annotations

import argparse
import time

from cass_plugins import Segmenter, load_clip, load_vfm

#: name → Segmenter overrides; every row but the first removes one component from the full model.
ABLATIONS: dict[str, dict] = {
    "full CASS": {},
    "- spectral distillation (VFM graph)": {"spectral": False},
    "- low rank (full VFM graph)": {"lowrank": None},
    "- dynamic eigenscaling": {"eigenscaling": False},
    "- similar instead of complementary matching": {"matching": "similar"},
    "- object presence prior (OPS)": {"presence_prior": False},
    "- text adjustment (OTA)": {"ota": False},
    "baseline only (NACLIP-style block)": {"spectral": False, "presence_prior": False, "ota": False},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", nargs="?", help="image file (default: scikit-image's astronaut)")
    p.add_argument("--classes", default="person, astronaut; rocket; sky")
    p.add_argument("--dataset", help="start from that dataset's preset values (cass.md §7)")
    p.add_argument("--short-side", type=int, help="override the resize (smaller = fewer windows = faster)")
    p.add_argument("--random-weights", action="store_true", help="random CLIP and VFM weights (no download)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    if args.image is None:
        from skimage import data

        image: object = data.astronaut()
    else:
        image = args.image
    weights = "random" if args.random_weights else None
    clip, tokenizer = load_clip("ViT-B-16", weights or "openai", device=args.device)
    vfm = load_vfm("vit_base_patch8_224.dino", weights or "pretrained", device=args.device)
    common = {"short_side": args.short_side} if args.short_side else {}

    reference = None
    print("(the first row also embeds the vocabulary's prompts; the embeddings are cached for the other rows)")
    print(f"{'configuration':<46} {'agreement':>9} {'mean|Δlogit|':>12} {'seconds':>8}")
    for name, overrides in ABLATIONS.items():
        start = time.perf_counter()
        with Segmenter(clip, vfm, vocabulary=args.classes, dataset=args.dataset, tokenizer=tokenizer,
                       **common, **overrides) as seg:
            result = seg.segment(image)
        seconds = time.perf_counter() - start
        if reference is None:
            reference = result
        agreement = float((result.labels == reference.labels).float().mean())
        delta = float((result.logits - reference.logits).abs().mean())
        print(f"{name:<46} {100 * agreement:8.1f}% {delta:12.4f} {seconds:8.1f}")


if __name__ == "__main__":
    main()
