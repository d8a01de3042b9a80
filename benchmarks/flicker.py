"""Flicker of video segmentation with and without the temporal-consistency components (docs/video.md).

A static scene: one ``skimage.data`` photo seen through a camera that shakes by up to ``--jitter`` pixels (each frame
is a crop of the photo at a random integer offset). Every frame is segmented with ``segment_video`` under
``temporal=off``, ``matching``, ``smoothing`` and ``on``; reported per mode:

* ``flicker``: the fraction of pixels whose label changes between consecutive frames, averaged over the pairs (the
  issue's figure; the jitter itself moves edges, so it is not 0 even for a perfect segmenter);
* ``flicker (aligned)``: the same after undoing the known camera shift (labels compared at the same scene point, on
  the overlap): what is left is flicker of the segmentation, not of the camera;
* ``head changes``: the fraction of (frame pair, window) whose fused CASS head assignment changed.

Models have random weights (nothing can be downloaded here): ``--models tiny`` (2-layer open_clip ViT + timm ViT,
as the tests use) or ``--models base`` (open_clip ``ViT-B-16-quickgelu`` + timm ``vit_base_patch8_224``, the CASS
pair). Random weights make the labels meaningless but the flicker measurable.

Usage::

    python benchmarks/flicker.py --models base --frames 8 --size 224 --short-side 224 --batch-size 1  # docs/video.md
    python benchmarks/flicker.py --models tiny                              # seconds
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(REPO))

from cass_plugins.pipeline.segmenter import Segmenter  # noqa: E402
from cass_plugins.video.segment import segment_video  # noqa: E402
from cass_plugins.video.temporal import TemporalConfig  # noqa: E402

CLASSES = "person; sky; rocket; wall; flag; ground"
MODES = ("off", "matching", "smoothing", "on")


def jittered_scene(frames: int, size: int, jitter: int, seed: int) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Crops of skimage's astronaut (resized so a crop is ``size`` square) at random offsets within ``jitter``."""
    from PIL import Image
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((size + 2 * jitter, size + 2 * jitter), Image.BILINEAR)
    photo = np.asarray(photo)
    rng = np.random.default_rng(seed)
    offsets = [tuple(int(v) for v in rng.integers(-jitter, jitter + 1, size=2)) for _ in range(frames)]
    crops = [np.ascontiguousarray(photo[jitter + dy: jitter + dy + size, jitter + dx: jitter + dx + size])
             for dy, dx in offsets]
    return crops, offsets


def aligned_change(a: np.ndarray, b: np.ndarray, oa: tuple[int, int], ob: tuple[int, int]) -> float:
    """Label change at the same scene points: frame k shows scene pixel (y + o_k) at (y, x)."""
    dy, dx = ob[0] - oa[0], ob[1] - oa[1]
    h, w = a.shape
    # scene point p: in a at p − oa, in b at p − ob = (p − oa) − (dy, dx)
    ya, xa = slice(max(0, dy), h + min(0, dy)), slice(max(0, dx), w + min(0, dx))
    yb, xb = slice(max(0, -dy), h + min(0, -dy)), slice(max(0, -dx), w + min(0, -dx))
    return float((a[ya, xa] != b[yb, xb]).mean())


def models(kind: str) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    import open_clip
    import timm

    torch.manual_seed(0)
    if kind == "base":
        clip = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
        vfm = timm.create_model("vit_base_patch8_224", pretrained=False, num_classes=0, dynamic_img_size=True)
        return clip.eval(), vfm.eval(), {}
    from open_clip.factory import _MODEL_CONFIGS
    from timm.models.vision_transformer import VisionTransformer

    _MODEL_CONFIGS["cass-tiny-vit"] = {
        "embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    clip = open_clip.create_model("cass-tiny-vit", pretrained=None)
    vfm = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=0,
                            dynamic_img_size=True)
    return clip.eval(), vfm.eval(), {"short_side": 64, "crop": 64, "stride": 32}


def measure(args: argparse.Namespace) -> str:
    clip, vfm, overrides = models(args.models)
    if args.short_side is not None:
        overrides["short_side"] = args.short_side
    frames, offsets = jittered_scene(args.frames, args.size, args.jitter, args.seed)
    rows = []
    with Segmenter(clip, vfm, text_cache=False, **overrides) as seg:  # random text tower: keep it out of the cache
        for mode in MODES:
            base = TemporalConfig()
            config = {"off": TemporalConfig(stable_matching=False, smoothing=0.0),
                      "matching": TemporalConfig(stable_matching=True, smoothing=0.0),
                      "smoothing": TemporalConfig(stable_matching=False), "on": base}[mode]
            start = time.perf_counter()
            out = list(segment_video(seg, frames, CLASSES, temporal=config, batch_size=args.batch_size))
            seconds = time.perf_counter() - start
            labels = [o.result.labels.numpy() for o in out]
            raw = np.mean([(a != b).mean() for a, b in zip(labels, labels[1:])])
            aligned = np.mean([aligned_change(a, b, oa, ob)
                               for a, b, oa, ob in zip(labels, labels[1:], offsets, offsets[1:])])
            heads = [[m.assignment.tolist() for m in o.result.record["matching"]] for o in out]
            pairs = [(p, c) for hp, hc in zip(heads, heads[1:]) for p, c in zip(hp, hc)]
            changes = np.mean([p != c for p, c in pairs]) if pairs else float("nan")
            rows.append((mode, raw, aligned, changes, len(out) / seconds))
            print(f"{mode:10s} flicker {raw:.4f} aligned {aligned:.4f} head changes {changes:.3f} "
                  f"{len(out) / seconds:.2f} frames/s", file=sys.stderr)
    windows = len(out[0].result.record["windows"])
    lines = [
        f"Random-weight `{args.models}` models, {args.frames} frames of {args.size}×{args.size} px (skimage astronaut, "
        f"camera jitter ±{args.jitter} px, seed {args.seed}), short side {seg.config.pipeline.short_side}, {windows} window(s) per frame, {CLASSES.count(';') + 1} "
        f"classes; `TemporalConfig()` defaults (tie margin {TemporalConfig.tie_margin}, β = {TemporalConfig.smoothing}, "
        f"motion threshold {TemporalConfig.motion_threshold}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads.",
        "",
        "| temporal | flicker | flicker (aligned) | head changes | frames/s |",
        "|---|---|---|---|---|",
        *(f"| `{m}` | {r:.4f} | {a:.4f} | {c:.3f} | {f:.2f} |" for m, r, a, c, f in rows),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", choices=("tiny", "base"), default="tiny")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--size", type=int, default=128, help="frame side in pixels")
    p.add_argument("--jitter", type=int, default=2, help="largest camera shift in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4, help="frames per segment_many batch (memory grows with it)")
    p.add_argument("--short-side", type=int, default=None,
                   help="resize frames to this short side (default: the preset's; 224 with --size 224 = one window)")
    args = p.parse_args(argv)
    print(measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
