"""Per-image time of the full CASS pipeline (cass.md §5): windows batched vs one at a time, and the authors' cost.

Full-size random-weight models: open_clip ViT-B-16 (quickgelu, the OpenAI layout) + timm vit_base_patch8_224
(the DINO ViT-B/8 layout), on a 500×375 photo (scikit-image's astronaut, resized) with the VOC20 vocabulary and the
``cass-official`` sliding-window configuration (short side 336 → 448×336 → 3×2 windows of 224², stride 112).
Every row segments the same image; after one untimed pass per row, the rows are interleaved (each repeat runs every
row once, in turn) and the median and minimum per row are printed side by side, so the ratios are taken on the same
machine state. The text
embeddings are computed once before timing (they are cached per vocabulary in real use too).

Rows:

* ``ours, window_batch=8``: the library as shipped: one whole-image CLIP pass (unmodified last block) for the prior,
  then the windows in batches through the patched CLIP, each window's VFM keys computed once.
* ``ours, window_batch=1``: the same, one window per forward.
* ``authors' cost, light`` (EMULATION, defined only in this script): window_batch=1, and for every window
  additionally the whole-image CLIP embedding (``image_embedding``, unmodified last block) and a second VFM
  forward on the crop - the two costs the authors' loop repeats per window (cass.md §6 "documented deviations").
* ``authors' cost, full`` (EMULATION, ``--full-emulation``): as above, but the per-window whole-image pass goes
  through the CASS last block, as the authors' ``encode_image`` does: CLIP on the whole image plus the VFM on its
  336² square and the spectral fusion at the whole-image grid.

The emulations only add the repeated work; their outputs equal ours (checked at the end).

    python benchmarks/pipeline.py [--repeats 3] [--device cpu] [--threads N] [--full-emulation]

Prints to stdout only; nothing is written to files.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from cass_plugins import Segmenter, Vocabulary, encode_dense, image_embedding
from cass_plugins.pipeline.windows import window_grid


class AuthorsCostSegmenter(Segmenter):
    """BENCHMARK-ONLY emulation of the authors' per-window cost (not part of the library).

    Per window it repeats the whole-image CLIP pass and runs the VFM a second time, then does exactly what
    :class:`Segmenter` does, so the segmentation is unchanged and only the time differs.

    Args:
        full: the repeated whole-image pass goes through the patched (CASS) last block - CLIP and the VFM on the
            whole image - instead of the unmodified block plus a second VFM pass on the crop.
    """

    def __init__(self, *args: Any, full: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.full = full
        self._whole: torch.Tensor | None = None
        window_logits = self.handle.logits

        def logits_with_authors_cost(crops: torch.Tensor, *a: Any, **kw: Any) -> torch.Tensor:
            self._repeat_whole_image_pass(crops)
            return window_logits(crops, *a, **kw)

        self.handle.logits = logits_with_authors_cost  # type: ignore[method-assign]

    def preprocess(self, image):  # keep the whole resized image for the repeated per-window pass
        x, original = super().preprocess(image)
        self._whole = x
        return x, original

    def _repeat_whole_image_pass(self, crops: torch.Tensor) -> None:
        if self.config.pipeline.mode == "slide" and self._whole is not None:
            if self.full:
                encode_dense(self.model, self._whole)  # CLIP + VFM(whole square) + spectral fusion, per window
            else:
                image_embedding(self.model, self._whole)  # the whole-image CLIP pass, per window
                self.handle.vfm.keys(crops)  # the second VFM forward on the window


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    import open_clip
    import timm
    from skimage import data

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--vocabulary", default="voc20", help="a built-in vocabulary (default: %(default)s)")
    p.add_argument("--full-emulation", action="store_true",
                   help="also time the authors' cost with the whole-image pass through the CASS block")
    args = p.parse_args()
    # Random weights have no place in the user's on-disk text cache (the in-memory cache still serves the rows).
    os.environ.setdefault("CASS_PLUGINS_NO_CACHE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).to(device).eval()
    vfm = timm.create_model("vit_base_patch8_224", pretrained=False, num_classes=0).to(device).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-16-quickgelu")
    image = np.asarray(Image.fromarray(data.astronaut()).resize((500, 375), Image.BILINEAR))  # W×H = 500×375
    vocab = Vocabulary.builtin(args.vocabulary)

    rows: dict[str, Any] = {
        "ours, window_batch=8": lambda: Segmenter(clip, vfm, vocabulary=vocab, tokenizer=tokenizer, window_batch=8),
        "ours, window_batch=1": lambda: Segmenter(clip, vfm, vocabulary=vocab, tokenizer=tokenizer, window_batch=1),
        "authors' cost, light (emulated)": lambda: AuthorsCostSegmenter(
            clip, vfm, vocabulary=vocab, tokenizer=tokenizer, window_batch=1),
    }
    if args.full_emulation:
        rows["authors' cost, full (emulated)"] = lambda: AuthorsCostSegmenter(
            clip, vfm, vocabulary=vocab, tokenizer=tokenizer, window_batch=1, full=True)

    with Segmenter(clip, vfm, vocabulary=vocab, tokenizer=tokenizer) as seg:  # warm-up: text embeddings, kernels
        x, _ = seg.preprocess(image)
        n_windows = len(window_grid(*x.shape[-2:], seg.config.crop, seg.config.stride))
        t0 = time.perf_counter()
        reference = seg.segment(image)
        warm = time.perf_counter() - t0
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"device {device} ({where}), torch {torch.__version__}; image 500×375 → "
          f"{x.shape[-1]}×{x.shape[-2]}, {n_windows} windows of 224²; {vocab.num_classes} classes / "
          f"{vocab.num_queries} queries; warm-up {warm:.1f} s (incl. text embeddings)")

    for make in rows.values():  # one untimed pass per row (first-call allocations, clustering caches)
        with make() as seg:
            seg.segment(image)
    times: dict[str, list[float]] = {name: [] for name in rows}
    outputs: dict[str, torch.Tensor] = {}
    for r in range(args.repeats):
        for name, make in rows.items():
            with make() as seg:
                _sync(device)
                t0 = time.perf_counter()
                result = seg.segment(image)
                _sync(device)
                times[name].append(time.perf_counter() - t0)
            outputs[name] = result.logits
        print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(f"{t[-1]:.2f}s" for t in times.values()), flush=True)

    base = statistics.median(times["ours, window_batch=8"])
    print(f"\n{'pipeline (per image)':<34} {'median s':>9} {'min s':>7} {'× ours (batch 8)':>17}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<34} {med:9.2f} {min(ts):7.2f} {med / base:16.2f}×")
    light = statistics.median(times["authors' cost, light (emulated)"])
    print(f"\nspeed-up of ours (window_batch=8) over the authors' cost, light: {light / base:.2f}×")
    if args.full_emulation:
        full = statistics.median(times["authors' cost, full (emulated)"])
        print(f"speed-up of ours (window_batch=8) over the authors' cost, full:  {full / base:.2f}×")
    for name, logits in outputs.items():  # the emulations add work, not differences
        diff = float((logits - reference.logits).abs().max())
        print(f"max |Δ logits| vs warm-up run, {name}: {diff:.1e}")


if __name__ == "__main__":
    main()
