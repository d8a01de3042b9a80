"""Inspect CASS's head matching for one image: cost heat map with the matched pairs marked (paper Fig. 4).

    python examples/matching_heatmap.py [IMAGE] [--random-weights] [--out matching.png]

With --random-weights it runs offline on random full-size models (the heads' spectra are then nearly tied: the
printed margin shows it, cass.md §10). Without it, CLIP ViT-B/16 (openai) and DINO ViT-B/8 are downloaded.
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from cass_plugins import encode_dense, load_clip, load_vfm, patch_clip  # noqa: E402
from cass_plugins.pipeline.image import clip_normalize, load_image, resize_short_side  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", nargs="?", help="image file (default: scikit-image's astronaut)")
    p.add_argument("--random-weights", action="store_true", help="random full-size models (offline)")
    p.add_argument("--out", default="matching.png")
    args = p.parse_args()

    weights = "random" if args.random_weights else None
    clip, _ = load_clip("ViT-B-16", weights or "openai")
    dino = load_vfm("vit_base_patch8_224.dino", weights or "pretrained")
    if args.image:
        rgb = load_image(args.image)
    else:
        import skimage.data

        rgb = load_image(skimage.data.astronaut())
    crop = clip_normalize(resize_short_side(rgb.float(), 224))[None, :, :224, :224]

    with torch.no_grad(), patch_clip(clip, dino, preset="cass-official") as handle:
        encode_dense(clip, crop)
        m = handle.last_matching[0]

    print(f"strategy {m.strategy}, pairing {m.pairing}, margin {m.margin:.3g} (0 = tied optimum)")
    print("CLIP head <- VFM head   w      rank")
    for clip_head, vfm_head in enumerate(m.assignment.tolist()):
        rank = int(m.ranks[clip_head]) if m.ranks is not None else "-"
        print(f"{clip_head:9d} <- {vfm_head:8d}   {float(m.weights[clip_head]):.4f}  {rank}")

    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(m.cost.numpy(), cmap="viridis")
    ax.scatter(range(m.cost.shape[1]), m.assignment.tolist(), marker="s", facecolors="none", edgecolors="red", s=120,
               label="matched pair")
    ax.set_xlabel("CLIP head")
    ax.set_ylabel("VFM head")
    ax.set_title(f"cost 1 - W (margin {m.margin:.2g})")
    ax.legend(loc="upper right", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
