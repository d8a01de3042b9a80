"""Trident's cost breakdown (paper Table 8; docs/spec/trident.md §15), side by side in one run.

Rows, each a complete segmentation in splice mode (windows 336 / stride 224, all windows of an image in one
forward, VOC21 values), full-size models with random weights (they cost what trained ones cost):

* ``CLIP``: MaskCLIP's last block, spliced (no VFM, no SAM) — the paper's "CLIP-B/16" row;
* ``+ DINO``: ProxyCLIP's last block with DINO ViT-B/16 (``trident-coarse`` without SAM);
* ``+ SAM``: SAM's image encoder at 1024² and the aggregation (``trident-coarse``);
* ``+ refinement``: SAM prompt refinement as well (``trident``): the encoder pass is shared, so this row adds only
  the prompt encoder and mask decoder calls.

Each row prints images/s, peak memory and the time relative to the ``CLIP`` row. The paper reports (RTX 4090,
fp16, 448×448): 118.8, 68.5, 15.3, 10.0 images/s.

Usage::

    python benchmarks/trident.py                                  # CPU, SAM ViT-B (about a minute per image)
    python benchmarks/trident.py --sam test --images 2            # CPU smoke run with the tiny SAM
    python benchmarks/trident.py --device cuda --precision fp16 --images 30

SAM's encoder runs in the requested precision; the refinement's random-weight masks are rarely accepted, which
does not change what is computed (the decoder runs for every prompted region).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:  # run as a script from a source checkout
        sys.path.insert(0, str(path))

from cass_plugins.backbone.loading import load_clip, load_vfm  # noqa: E402
from cass_plugins.backbone.sam import load_sam  # noqa: E402
from cass_plugins.pipeline.segmenter import Segmenter  # noqa: E402
from cass_plugins.pipeline.templates import IMAGENET_TEMPLATES  # noqa: E402
from cass_plugins.pipeline.text import encode_text  # noqa: E402
from cass_plugins.pipeline.vocabulary import Vocabulary  # noqa: E402
from suite import Row, _fmt_num, _fmt_rate, _measure, _release_memory, describe_machine  # noqa: E402

CLIP_NAME = "ViT-B-16-quickgelu"
VFM_NAME = "vit_base_patch16_224"  # Trident's DINO ViT-B/16 architecture

#: (label, Segmenter keywords) in the order of Table 8.
ROWS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("CLIP", {"preset": "trident-coarse", "baseline": "maskclip", "components": []}),
    ("+ DINO", {"preset": "trident-coarse", "components": []}),
    ("+ SAM", {"preset": "trident-coarse"}),
    ("+ refinement", {"preset": "trident"}),
)
PAPER_IMAGES_PER_SECOND = {"CLIP": 118.8, "+ DINO": 68.5, "+ SAM": 15.3, "+ refinement": 10.0}


def run(device: str, precision: str, sam_kind: str, n_images: int, warmup: int, size: tuple[int, int],
        vocabulary: Vocabulary) -> list[Row]:
    """Every row of Table 8 on one device and precision."""
    torch.manual_seed(0)
    clip, tokenizer = load_clip(CLIP_NAME, "random", device=device, precision=precision)
    vfm = load_vfm(VFM_NAME, "random", device=device, precision=precision)
    sam_precision = "fp32" if sam_kind == "vit_h" and precision == "fp16" else precision
    sam = load_sam(sam_kind, "random", device=device, precision=sam_precision)
    # the text classifier is per vocabulary, not per image: one template keeps the set-up short and the timed loop
    # identical (the embeddings' values do not change the cost)
    text = encode_text(clip, tokenizer, vocabulary, IMAGENET_TEMPLATES[:1], device=device, cache=False)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8) for _ in range(warmup + n_images)]
    rows = []
    for label, kwargs in ROWS:
        uses_sam = kwargs.get("components", ("sam",)) != []
        seg = Segmenter(clip, vfm, vocabulary=vocabulary, tokenizer=tokenizer, dataset="voc21",
                        sam=sam if uses_sam else None, **kwargs)
        seg.text_embeddings = lambda v, _t=text: _t  # type: ignore[method-assign]  (per vocabulary, not per image)
        try:
            rows.append(_measure(label, device, precision, lambda img: seg.segment(img), images, warmup))
        finally:
            seg.close()
    del clip, vfm, sam
    _release_memory()
    return rows


def report(rows: list[Row], args: argparse.Namespace) -> str:
    reference = next((r for r in rows if r.method == "CLIP" and r.seconds_per_image), None)
    lines = [
        f"### Trident breakdown ({args.device}, {args.precision}, SAM {args.sam}, {args.size[0]}×{args.size[1]}, "
        f"{args.images} image(s))", "",
        *describe_machine([args.device]), "",
        "| row | images/s | × CLIP time | peak MiB | paper images/s (RTX 4090 fp16) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = (f"{r.seconds_per_image / reference.seconds_per_image:.2f}"
                 if reference is not None and r.seconds_per_image else "–")
        lines.append(f"| {r.method} | {_fmt_rate(r)} | {ratio} | {_fmt_num(r.peak_mib)} | "
                     f"{PAPER_IMAGES_PER_SECOND[r.method]} |" + (f" ({r.error})" if r.error else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--sam", default="vit_b", choices=("vit_b", "vit_l", "vit_h", "test"))
    p.add_argument("--images", type=int, default=None, help="timed images per row (default: 1 on CPU, 30 on CUDA)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--size", type=lambda s: tuple(int(v) for v in s.lower().split("x")), default=(448, 448),
                   help="image HxW (default 448x448, as Table 8)")
    p.add_argument("--out", type=Path, default=None, help="also append the Markdown section to this file")
    args = p.parse_args(argv)
    if args.images is None:
        args.images = 30 if args.device.startswith("cuda") else 1
    vocabulary = Vocabulary.builtin("voc21", method="proxyclip")
    rows = run(args.device, args.precision, args.sam, args.images, args.warmup, args.size, vocabulary)
    section = report(rows, args)
    print(section)
    if args.out is not None:
        with args.out.open("a") as f:
            f.write("\n" + section + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
