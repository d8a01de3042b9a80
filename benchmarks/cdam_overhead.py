"""CDAM's added time over its baseline (SCLIP), per sliding window, on a full-size random-weight ViT-B/16.

What is measured: the wall time of one ``encode_dense`` call on one 448×448 window (the CDAM presets' window,
28×28 = 784 patches), i.e. the whole image tower with the patched last block, for

* ``sclip``: SCLIP's last block alone;
* ``sclip+cdam``: the same baseline with the CDAM component (S0 against ``n_cls + 80`` queries, the 7-scale JSD
  maps, pass 2 through the last block).

Both run on the same patched model (the CDAM plugin is registered / unregistered between calls), interleaved
(A, B, A, B, ...) after warm-up; the medians and their ratio are printed. The text embeddings are random unit
vectors: the text tower runs once per vocabulary, not per window, so it is outside both timings. Also printed: the
CDAM maps alone (``multiscale_cdam`` on the window's S0). The paper's numbers (spec §16, A100, fp16, per *image*,
VOC21): SCLIP 0.018 s → SCLIP + CDAM 0.044 s (×2.4).

Usage: ``python benchmarks/cdam_overhead.py [--repeats 9] [--classes 21] [--device cpu|cuda] [--fp16]``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cass_plugins.adapters.cdam import CDAM  # noqa: E402
from cass_plugins.adapters import cdam_math as cm  # noqa: E402
from cass_plugins import encode_dense, patch_clip  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per configuration (interleaved)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--classes", type=int, default=21, help="n_cls; the queries of S0 are n_cls + 80 (VOC21: 21)")
    parser.add_argument("--window", type=int, default=448)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp16", action="store_true", help="run the model in fp16 (the authors' GPU setting)")
    args = parser.parse_args(argv)

    import open_clip

    device = torch.device(args.device)
    dtype = torch.float16 if args.fp16 else torch.float32
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).visual  # the image tower is all a window needs
    model = model.to(device=device, dtype=dtype).eval()
    embed_dim = model.proj.shape[1]
    text = F.normalize(torch.randn(args.classes, embed_dim), dim=-1)
    atp = F.normalize(torch.randn(len(cm.ATP_PROMPTS), embed_dim), dim=-1)
    window = torch.randn(1, 3, args.window, args.window, device=device, dtype=dtype)

    handle = patch_clip(model, preset="cdam-sclip")
    cdam: CDAM = handle.pm.get_plugin("cdam")
    cdam.set_text(text.to(device), atp.to(device))

    def run(with_cdam: bool) -> None:
        registered = handle.pm.get_plugin("cdam") is not None
        if with_cdam and not registered:
            handle.pm.register(cdam, name="cdam")
        elif not with_cdam and registered:
            handle.pm.unregister(cdam)
        encode_dense(model, window)

    grid = (args.window // 16, args.window // 16)
    with torch.no_grad():
        s0 = F.normalize(torch.randn(1, grid[0] * grid[1], embed_dim, device=device), dim=-1) @ cdam.query_embeddings(
            device).t()
        for _ in range(args.warmup):
            run(False)
            run(True)
            cdam.attention(s0, grid)
        times: dict[str, list[float]] = {"sclip": [], "sclip+cdam": [], "cdam maps only": []}
        for _ in range(args.repeats):
            times["sclip"].append(_timed(lambda: run(False), device))
            times["sclip+cdam"].append(_timed(lambda: run(True), device))
            times["cdam maps only"].append(_timed(lambda: cdam.attention(s0, grid), device))
    handle.remove()

    med = {k: statistics.median(v) for k, v in times.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads "
        f"(os.cpu_count={os.cpu_count()})")
    n_q = args.classes + len(cm.ATP_PROMPTS)
    print(f"CDAM overhead per {args.window}x{args.window} window ({grid[0]}x{grid[1]} patches, {n_q} queries = "
          f"{args.classes} classes + 80 ATP), open_clip ViT-B-16 random weights, {str(dtype).replace('torch.', '')}, "
          f"batch 1, {where}; median of {args.repeats} interleaved runs after {args.warmup} warm-up")
    print("measured: encode_dense of one window = image tower incl. patched last block (text tower excluded)")
    for k, v in med.items():
        print(f"  {k:<16} {v * 1000:9.1f} ms   (min {min(times[k]) * 1000:.1f}, max {max(times[k]) * 1000:.1f})")
    print(f"  ratio sclip+cdam / sclip = {med['sclip+cdam'] / med['sclip']:.2f}  "
          f"(added {1000 * (med['sclip+cdam'] - med['sclip']):.1f} ms per window)")
    print("  paper (spec §16; A100, fp16, per image, VOC21): SCLIP 0.018 s -> SCLIP + CDAM 0.044 s, ratio 2.44")


if __name__ == "__main__":
    main()
