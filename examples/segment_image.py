"""Segment one image with CASS from Python.

    python examples/segment_image.py photo.jpg --classes "cat, kitten; sofa; wall"
    python examples/segment_image.py --random-weights            # offline smoke test (about a minute on 2 cores)

Without an image path, scikit-image's astronaut photo is used. By default the real pretrained weights are loaded
(OpenAI CLIP ViT-B/16 and DINO ViT-B/8, downloaded once by open_clip / timm); offline, pass checkpoint files with
``--pretrained FILE --vfm-weights FILE`` or use ``--random-weights`` (meaningless labels, but every step runs).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cass_plugins import Segmenter, load_clip, load_vfm
from cass_plugins.pipeline.image import load_image
from cass_plugins.pipeline.visualize import legend_overlay


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", nargs="?", help="image file (default: scikit-image's astronaut)")
    p.add_argument("--classes", default="person, astronaut; flag; rocket; sky, space",
                   help="';' separates classes, ',' synonyms (default: %(default)s)")
    p.add_argument("--clip", default="ViT-B-16")
    p.add_argument("--pretrained", default="openai", help="open_clip tag or checkpoint file (default: %(default)s)")
    p.add_argument("--vfm", default="vit_base_patch8_224.dino")
    p.add_argument("--vfm-weights", default="pretrained", help="'pretrained' or a checkpoint file")
    p.add_argument("--random-weights", action="store_true", help="random CLIP and VFM weights (no download)")
    p.add_argument("--dataset", help="use the preset's values for a benchmark, e.g. voc21, ade20k")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("segmentation.png"), help="overlay with legend to write")
    args = p.parse_args()

    if args.image is None:
        from skimage import data

        image: object = data.astronaut()
    else:
        image = args.image
    if args.random_weights:
        args.pretrained, args.vfm_weights = "random", "random"

    # 1. Models: an open_clip CLIP and a timm ViT as the vision foundation model.
    clip, tokenizer = load_clip(args.clip, args.pretrained, device=args.device)
    vfm = load_vfm(args.vfm, args.vfm_weights, device=args.device)

    # 2. A Segmenter patches CLIP's last block for as long as the `with` block lasts.
    with Segmenter(clip, vfm, vocabulary=args.classes, dataset=args.dataset, tokenizer=tokenizer) as seg:
        cfg = seg.config.to_dict()  # every knob; seg.describe() prints them all as JSON
        print("configuration:", {k: cfg[k] for k in ("mode", "short_side", "crop", "stride", "gamma", "alpha",
                                                       "h_threshold", "prob_thd", "lowrank", "fusion_lambda")})
        result = seg.segment(image)  # a path, a PIL image, a numpy array or a tensor

    # 3. The result: labels (H, W), per-class probabilities (C, H, W) and raw logits (Q, H, W).
    print(f"labels {tuple(result.labels.shape)}, probs {tuple(result.probs.shape)}, "
          f"logits {tuple(result.logits.shape)}")
    for name, share in sorted(result.class_areas().items(), key=lambda kv: -kv[1]):
        print(f"  {name:<12} {100 * share:5.1f} %")
    confidence = result.probs.max(0).values
    print(f"mean confidence {float(confidence.mean()):.3f}")

    rgb = load_image(image)
    legend_overlay(rgb, result.labels, result.vocabulary.class_names, result.class_areas()).save(args.out)
    print(f"wrote {args.out} ({np.asarray(rgb.shape[1:]).tolist()} image + legend)")


if __name__ == "__main__":
    main()
