"""CASS images/s: ``segment`` one image at a time vs ``segment_many`` vs the bare CLIP + VFM forwards on the same
windows, interleaved (issue 13).

Full-size random-weight models (open_clip ViT-B-16-quickgelu + timm vit_base_patch8_224, the CASS pair) on
synthetic VOC-size images (500×375 → 448×336, 6 windows of 224², stride 112), the ``cass-official`` preset with the
VOC21 vocabulary (one prompt template: the text is computed once, outside the timing). Every repeat runs each row once
on the same ``--images`` images, in turn, so the ratios are taken on the same machine state (a shared machine's load
moves all rows together); the median per row is printed.

Rows:

* ``segment ×1``: ``Segmenter.segment`` per image (windows in forwards of 8);
* ``segment_many ×N``: the ``--images`` images in one ``segment_many`` batch (their windows share forwards);
* ``CLIP + VFM forwards``: unpatched CLIP dense features and the VFM's keys (what CASS reads) on the same windows,
  in the same forwards as ``segment_many``.

    python benchmarks/throughput.py [--device cpu|cuda] [--precision fp32|fp16|bf16] [--images 4] [--repeats 3]

Prints to stdout only.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(REPO))

from cass_plugins.backbone.loading import load_clip, load_vfm  # noqa: E402
from cass_plugins.core.patch import encode_dense  # noqa: E402
from cass_plugins.pipeline.segmenter import Segmenter  # noqa: E402
from cass_plugins.pipeline.text import encode_text  # noqa: E402
from cass_plugins.pipeline.vocabulary import Vocabulary  # noqa: E402
from cass_plugins.pipeline.windows import window_grid  # noqa: E402

PROTOCOL = dict(short_side=336, mode="slide", crop=224, stride=112, window_batch=8, pamr_steps=0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--images", type=int, default=4, help="images per repeat (the segment_many batch)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    clip, tokenizer = load_clip("ViT-B-16-quickgelu", "random", device=args.device, precision=args.precision)
    vfm = load_vfm("vit_base_patch8_224", "random", device=args.device, precision=args.precision)
    vocab = Vocabulary.builtin("voc21")
    text = encode_text(clip, tokenizer, vocab, ("a photo of a {}.",), device=args.device, cache=False)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (375, 500, 3), dtype=np.uint8) for _ in range(args.images)]

    seg = Segmenter(clip, vfm, vocabulary=vocab, tokenizer=tokenizer, preset="cass-official", **PROTOCOL)
    seg.text_embeddings = lambda v: text  # type: ignore[method-assign]  (per vocabulary, outside the timing)
    prepared = [seg.prepare(im) for im in images]
    cfg = seg.config.pipeline
    crops = []
    for pi in prepared:
        h, w = pi.x.shape[-2:]
        crops += [pi.x[:, :, y1:y2, x1:x2] for (y1, y2, x1, x2) in window_grid(h, w, cfg.crop, cfg.stride)]
    per = cfg.window_batch * args.images
    forwards = [torch.cat(crops[i:i + per]).to(device) for i in range(0, len(crops), per)]
    runner = seg.handle.vfm  # the patch's own VFM runner: keys only, as CASS reads them

    def one_by_one() -> None:
        for im in images:
            seg.segment(im)

    def many() -> None:
        list(seg.segment_many(images, batch_size=args.images))

    def two_forwards() -> None:
        with seg.handle.bypassed():
            for c in forwards:
                encode_dense(clip, c)
        for c in forwards:
            runner.keys(c)

    rows = {"segment ×1": one_by_one, f"segment_many ×{args.images}": many, "CLIP + VFM forwards": two_forwards}
    times: dict[str, list[float]] = {k: [] for k in rows}
    with torch.no_grad():
        for fn in rows.values():  # untimed: allocator, kernels, cuBLAS handles
            fn()
        for r in range(args.repeats):
            for name, fn in rows.items():
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[name].append((time.perf_counter() - t0) / args.images)
            print(f"repeat {r + 1}: " + ", ".join(f"{k} {1000 * v[-1]:,.0f} ms/img" for k, v in times.items()),
                  flush=True)
    seg.close()
    base = statistics.median(times["CLIP + VFM forwards"])
    print(f"\n{args.device} {args.precision}, {args.images} images of 500×375 (6 windows each), median of "
          f"{args.repeats} interleaved repeats:")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:<22} {1 / m:8.2f} img/s  {1000 * m:9,.1f} ms/img  × forwards {m / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
