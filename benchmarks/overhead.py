"""CASS overhead on one crop: patched forward ÷ (unpatched CLIP forward + VFM forward), from one run.

Full-size random-weight models: open_clip ViT-B-16 (quickgelu) + timm vit_base_patch8_224 (DINO B/8 layout).
The three measurements are interleaved (each repeat runs all three) and the median of each is reported, so the
ratio is taken side by side on the same machine state.

    python benchmarks/overhead.py [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--repeats 7] [--size 224 224]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import cass_plugins as cp


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def main() -> None:
    import open_clip
    import timm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    p.add_argument("--lowrank", default="randomized")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).to(device, dtype).eval()
    vfm = timm.create_model("vit_base_patch8_224", pretrained=False, num_classes=0).to(device, dtype).eval()
    x = torch.randn(args.batch, 3, *args.size, device=device, dtype=dtype)
    runner = cp.VFMRunner(vfm)  # the VFM forward CASS needs: square input, stopped at the last block's keys

    def clip_only() -> None:
        cp.encode_dense(clip, x)

    def vfm_only() -> None:
        runner.keys(x)

    handle = cp.patch_clip(clip, vfm, lowrank=None if args.lowrank == "none" else args.lowrank)
    handle.remove()
    times: dict[str, list[float]] = {"clip": [], "vfm": [], "patched": []}
    with torch.inference_mode():
        for i in range(args.repeats + 1):
            handle = cp.patch_clip(clip, vfm, lowrank=None if args.lowrank == "none" else args.lowrank)
            t_patched = timed(lambda: cp.encode_dense(clip, x), device)
            handle.remove()
            t_clip = timed(clip_only, device)
            t_vfm = timed(vfm_only, device)
            if i:  # first round is warm-up
                times["patched"].append(t_patched)
                times["clip"].append(t_clip)
                times["vfm"].append(t_vfm)
    runner.remove()
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["patched"] / (med["clip"] + med["vfm"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; dtype {args.dtype}; crop {args.size[0]}x{args.size[1]}, batch {args.batch}; "
          f"lowrank {args.lowrank}; median of {args.repeats}")
    print(f"unpatched CLIP forward : {med['clip'] * 1e3:9.1f} ms")
    print(f"VFM forward (keys)     : {med['vfm'] * 1e3:9.1f} ms")
    print(f"patched CASS forward   : {med['patched'] * 1e3:9.1f} ms")
    print(f"overhead ratio patched / (CLIP + VFM) = {ratio:.3f}")


if __name__ == "__main__":
    main()
