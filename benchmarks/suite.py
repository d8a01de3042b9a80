"""Throughput and peak memory of vanilla CLIP, every registered baseline and CASS, side by side in one run.

Full-size models with random weights (open_clip ``ViT-B-16-quickgelu`` + timm ``vit_base_patch8_224``, the CASS
pair; random weights cost the same as trained ones) on synthetic VOC-sized images, under one protocol for every
method: short side 336, sliding windows 224 / stride 112, window batch 8, no PAMR (cass.md §5). Method-specific
protocol values (ClearCLIP's 448 crops, NACLIP's PAMR, ...) are deliberately not applied, so the rows compare the
cost of the last block and the components, not of different protocols.

Rows:

* ``CLIP forward`` / ``VFM forward``: the bare forwards over the image's windows (unpatched CLIP dense features;
  full timm forward) — what CASS's overhead is measured against;
* ``CLIP (unpatched)``: a complete segmentation (resize, windows, cosine logits, label map) with the unmodified model;
* one row per baseline in ``cass_plugins.core.registry.REGISTRY`` (components off);
* ``CASS``: the ``cass-official`` preset (spectral distillation + OPS + OTA);
* multi-image rows (``--batch-sizes``, issue 13): every method above through ``Segmenter.segment_many`` with the
  windows of ``batch`` images per forward, and the CLIP / VFM forwards on the same windows batched the same way; the
  "× (CLIP + VFM)" column divides each row by the two forwards of its own batch size;
* ``CASS e2e``: ``segment_many`` fed by a ``DataLoader`` (``--workers``) decoding JPEG files, pinned memory: what
  ``cass-eval`` runs, decode included;
* ``CASS compiled`` (``--compile``): ``Segmenter(compile=True)``, after an untimed compiling pass.

The text classifier is computed once per model outside the timed loop (it is per vocabulary, not per image).

Usage::

    python benchmarks/suite.py                          # CPU (+ CUDA fp32/fp16/bf16 when available), to stdout
    python benchmarks/suite.py --device cuda --dtypes fp16,bf16 --images 50 --out docs/benchmarks.md --append
    python benchmarks/suite.py --device cuda --dtypes fp16 --batch-sizes 1,8,32 --workers 4 --compile

The Markdown section is printed; a file is written only where ``--out`` says (never a tracked file by default).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(REPO))

from cass_plugins.pipeline.image import clip_normalize, load_image, resize_short_side  # noqa: E402
from cass_plugins.cass.ota import TextEmbeddingAdjuster  # noqa: E402
from cass_plugins.core.patch import encode_dense  # noqa: E402
from cass_plugins.pipeline.postprocess import logits_to_labels, upsample_logits  # noqa: E402
from cass_plugins.core.config import resolve_config  # noqa: E402
from cass_plugins.pipeline.segmenter import Segmenter  # noqa: E402
from cass_plugins.pipeline.templates import IMAGENET_TEMPLATES  # noqa: E402
from cass_plugins.pipeline.text import encode_text  # noqa: E402
from cass_plugins.pipeline.vocabulary import Vocabulary  # noqa: E402
from cass_plugins.pipeline.windows import SlidingWindowAccumulator, iter_window_batches, window_grid  # noqa: E402

CLIP_NAME = "ViT-B-16-quickgelu"
VFM_NAME = "vit_base_patch8_224"
# One protocol for every row (see the module docstring).
PROTOCOL: dict[str, Any] = {"short_side": 336, "mode": "slide", "crop": 224, "stride": 112, "window_batch": 8,
                            "pamr_steps": 0}


# ----------------------------------------------------------------------------------------------------------------
# Memory


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _release_memory() -> None:
    """Give freed memory back (gc, CUDA cache, glibc arenas) so each row's RSS starts from the same floor."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _RSSSampler:
    """Peak resident set size of this process, sampled every ``interval`` s in a thread (CPU runs)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = _rss_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() or 0)
            self._stop.wait(self.interval)

    def __enter__(self) -> "_RSSSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() or 0)


# ----------------------------------------------------------------------------------------------------------------
# Methods


@dataclass
class Row:
    method: str
    device: str
    dtype: str
    seconds_per_image: float | None = None
    peak_mib: float | None = None
    delta_mib: float | None = None
    error: str | None = None
    batch: int = 1  # images per segment_many batch (1: segment() one image at a time)


class UnpatchedCLIP:
    """Vanilla CLIP segmentation with the unmodified model: same windows and post-processing, no hooks."""

    def __init__(self, model: torch.nn.Module, text_fn: Callable[[Vocabulary], torch.Tensor]) -> None:
        self.model, self.text_fn = model, text_fn
        self.config = resolve_config("cass-official", **PROTOCOL)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def segment(self, image: np.ndarray, vocabulary: Vocabulary) -> torch.Tensor:
        cfg = self.config
        rgb = load_image(image)
        original = (rgb.shape[-2], rgb.shape[-1])
        x = clip_normalize(resize_short_side(rgb.float(), cfg.short_side, cfg.max_long_side))[None].to(self.device)
        text = self.text_fn(vocabulary)
        h, w = x.shape[-2:]
        acc = SlidingWindowAccumulator(vocabulary.num_queries, h, w, device=x.device)
        for batch in iter_window_batches(window_grid(h, w, cfg.crop, cfg.stride), cfg.window_batch):
            crops = torch.cat([x[:, :, y1:y2, x1:x2] for (y1, y2, x1, x2) in batch])
            features = encode_dense(self.model, crops).features.float()
            acc.add_batch(batch, TextEmbeddingAdjuster.logits(features, text))
        logits = upsample_logits(acc.result(), original)
        labels, _ = logits_to_labels(logits, vocabulary.query_to_class_tensor(logits.device),
                                     logit_scale=cfg.logit_scale, prob_thd=cfg.prob_thd)
        return labels.cpu()


def _window_crops(image: np.ndarray, device: torch.device) -> list[torch.Tensor]:
    cfg = resolve_config("cass-official", **PROTOCOL)
    x = clip_normalize(resize_short_side(load_image(image).float(), cfg.short_side, cfg.max_long_side))[None]
    h, w = x.shape[-2:]
    return [torch.cat([x[:, :, y1:y2, x1:x2] for (y1, y2, x1, x2) in b]).to(device)
            for b in iter_window_batches(window_grid(h, w, cfg.crop, cfg.stride), cfg.window_batch)]


def _load_models(device: str, dtype: str) -> tuple[torch.nn.Module, Any, torch.nn.Module]:
    from cass_plugins.backbone.loading import load_clip, load_vfm

    torch.manual_seed(0)
    clip, tokenizer = load_clip(CLIP_NAME, "random", device=device, precision=dtype)
    vfm = load_vfm(VFM_NAME, "random", device=device, precision=dtype)
    return clip, tokenizer, vfm


def _baselines() -> list[str]:
    from cass_plugins.core.registry import REGISTRY

    REGISTRY.load()
    return sorted(REGISTRY.baselines)


# ----------------------------------------------------------------------------------------------------------------
# Timing


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _measure(name: str, device: str, dtype: str, step: Callable[[Any], Any], images: list[Any],
             warmup: int, batch: int = 1) -> Row:
    """Run ``step`` on ``warmup`` items, then time it on the rest while tracking peak memory.

    With ``batch > 1`` the items are lists of ``batch`` images and the time is per image.
    """
    row = Row(name, device, dtype, batch=batch)
    try:
        with torch.no_grad():
            for img in images[:warmup]:
                step(img)
            _sync(device)
            _release_memory()
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                start = time.perf_counter()
                for img in images[warmup:]:
                    step(img)
                _sync(device)
                elapsed = time.perf_counter() - start
                row.peak_mib = torch.cuda.max_memory_allocated() / 2**20
                row.delta_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
            else:
                base = _rss_bytes()
                with _RSSSampler() as sampler:
                    start = time.perf_counter()
                    for img in images[warmup:]:
                        step(img)
                    elapsed = time.perf_counter() - start
                if base is not None:
                    row.peak_mib = sampler.peak / 2**20
                    row.delta_mib = (sampler.peak - base) / 2**20
        row.seconds_per_image = elapsed / max(len(images) - warmup, 1) / batch
    except Exception as err:  # one failing method must not lose the other rows
        row.error = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    print(f"  {name:<20} ×{batch:<3} {_fmt_rate(row):>8} img/s  peak {_fmt_num(row.peak_mib)} MiB"
          + (f"  ({row.error})" if row.error else ""), flush=True)
    return row


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items) - size + 1, size)]


def _batched_crops(images: list[np.ndarray], device: torch.device, batch: int) -> list[torch.Tensor]:
    """The windows of ``images``, in forwards of ``window_batch × batch`` windows (as segment_many groups them)."""
    cfg = resolve_config("cass-official", **PROTOCOL)
    crops = []
    for image in images:
        x = clip_normalize(resize_short_side(load_image(image).float(), cfg.short_side, cfg.max_long_side))[None]
        h, w = x.shape[-2:]
        crops += [x[:, :, y1:y2, x1:x2] for (y1, y2, x1, x2) in window_grid(h, w, cfg.crop, cfg.stride)]
    per = cfg.window_batch * batch
    return [torch.cat(crops[i:i + per]).to(device, non_blocking=True) for i in range(0, len(crops), per)]


class _JPEGs(torch.utils.data.Dataset):
    """JPEG files decoded, resized and normalised in DataLoader workers (as cass-eval's PreparedImages)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.cfg = resolve_config("cass-official", **PROTOCOL).pipeline

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        from cass_plugins.pipeline.segmenter import prepare_image

        return prepare_image(self.paths[i], self.cfg.short_side, self.cfg.max_long_side)


def run_device(device: str, dtype: str, n_images: int, warmup: int, size: tuple[int, int], vocab: Vocabulary,
               templates: tuple[str, ...], methods: set[str] | None, batch_sizes: tuple[int, ...] = (),
               workers: int = 0, compile_row: bool = False) -> list[Row]:
    """All rows for one device and dtype."""
    print(f"== {device} {dtype}", flush=True)
    clip, tokenizer, vfm = _load_models(device, dtype)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8) for _ in range(warmup + n_images)]
    multi = [b for b in batch_sizes if b > 1]
    # batched rows: one untimed batch, then at least two timed batches (or n_images) of synthetic images
    pool = [rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
            for _ in range(max([warmup + n_images] + [3 * b for b in multi]))]
    text_cache: dict[tuple[str, ...], torch.Tensor] = {}

    def text_fn(v: Vocabulary) -> torch.Tensor:
        # Per vocabulary, not per image: computed at the first (warm-up) image and reused. cache=False: random
        # weights have no place in the user's on-disk text cache (this dict is the benchmark's cache).
        if v.queries not in text_cache:
            text_cache[v.queries] = encode_text(clip, tokenizer, v, templates, device=device, cache=False)
        return text_cache[v.queries]

    def wanted(name: str) -> bool:
        return methods is None or name.lower() in methods

    rows: list[Row] = []
    dev = torch.device(device)
    vfm_dtype = next(vfm.parameters()).dtype
    if wanted("clip-forward"):
        rows.append(_measure("CLIP forward", device, dtype,
                             lambda img: [encode_dense(clip, c) for c in _window_crops(img, dev)], images, warmup))
    if wanted("vfm-forward"):
        rows.append(_measure("VFM forward", device, dtype,
                             lambda img: [vfm(c.to(vfm_dtype)) for c in _window_crops(img, dev)], images, warmup))
    for b in multi:
        batches = _chunks(pool[: max(3 * b, (warmup + n_images) // b * b)], b)
        if wanted("clip-forward"):
            rows.append(_measure("CLIP forward", device, dtype,
                                 lambda imgs: [encode_dense(clip, c) for c in _batched_crops(imgs, dev, b)],
                                 batches, 1, batch=b))
        if wanted("vfm-forward"):
            rows.append(_measure("VFM forward", device, dtype,
                                 lambda imgs: [vfm(c.to(vfm_dtype)) for c in _batched_crops(imgs, dev, b)],
                                 batches, 1, batch=b))
    if wanted("clip"):
        unpatched = UnpatchedCLIP(clip, text_fn)
        rows.append(_measure("CLIP (unpatched)", device, dtype, lambda img: unpatched.segment(img, vocab), images,
                             warmup))

    def segmenter_row(label: str, **kwargs: Any) -> None:
        try:
            seg = Segmenter(clip, vfm, vocabulary=vocab, tokenizer=tokenizer, **kwargs)
        except Exception as err:
            rows.append(Row(label, device, dtype, error=f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"))
            print(f"  {label:<20} failed to build: {rows[-1].error}", flush=True)
            return
        seg.text_embeddings = text_fn  # type: ignore[method-assign]  (the per-vocabulary cost, outside the loop)
        try:
            rows.append(_measure(label, device, dtype, lambda img: seg.segment(img), images, warmup))
            for b in multi:
                batches = _chunks(pool[: max(3 * b, (warmup + n_images) // b * b)], b)
                rows.append(_measure(label, device, dtype, lambda imgs: list(seg.segment_many(imgs, batch_size=b)),
                                     batches, 1, batch=b))
        finally:
            seg.close()

    for name in _baselines():
        if wanted(name):
            segmenter_row(name, preset="cass-official", baseline=name, components=[], **PROTOCOL)
    if wanted("cass"):
        segmenter_row("CASS", preset="cass-official", **PROTOCOL)
    if wanted("cass-e2e") and multi:
        rows += _end_to_end_rows(clip, vfm, tokenizer, vocab, text_fn, pool, device, dtype, max(multi), workers)
    if compile_row and multi:
        b = max(multi)
        try:
            seg = Segmenter(clip, vfm, vocabulary=vocab, tokenizer=tokenizer, compile=True, preset="cass-official",
                            **PROTOCOL)
            seg.text_embeddings = text_fn  # type: ignore[method-assign]
            batches = _chunks(pool[: max(3 * b, (warmup + n_images) // b * b)], b)
            t0 = time.perf_counter()
            list(seg.segment_many(batches[0], batch_size=b))  # compiles
            print(f"  compiling took {time.perf_counter() - t0:.1f} s", flush=True)
            rows.append(_measure("CASS compiled", device, dtype,
                                 lambda imgs: list(seg.segment_many(imgs, batch_size=b)), batches, 1, batch=b))
            seg.close()
        except Exception as err:
            rows.append(Row("CASS compiled", device, dtype, batch=b,
                            error=f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"))
    del clip, vfm
    _release_memory()
    return rows


def _end_to_end_rows(clip: Any, vfm: Any, tokenizer: Any, vocab: Vocabulary, text_fn: Callable, pool: list,
                     device: str, dtype: str, batch: int, workers: int) -> list[Row]:
    """CASS on JPEG files: DataLoader workers decode and resize, segment_many on the device (cass-eval's path)."""
    import tempfile

    from PIL import Image

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, img in enumerate(pool):
            paths.append(Path(tmp) / f"{i:04d}.jpg")
            Image.fromarray(img).save(paths[-1], quality=90)
        seg = Segmenter(clip, vfm, vocabulary=vocab, tokenizer=tokenizer, preset="cass-official", **PROTOCOL)
        seg.text_embeddings = text_fn  # type: ignore[method-assign]

        def run(chunk: list[Path]) -> None:
            loader = torch.utils.data.DataLoader(_JPEGs(chunk), batch_size=None, num_workers=workers,
                                                 pin_memory=device.startswith("cuda"))
            for _ in seg.segment_many(iter(loader), batch_size=batch, maps=False):
                pass

        n = len(paths) - batch  # the first batch warms up; the rest is one stream (workers overlap the GPU)
        try:
            rows.append(_measure(f"CASS e2e ({workers} workers)", device, dtype, run, [paths[:batch], paths[batch:]],
                                 1, batch=n))
            rows[-1].batch = batch  # the timing was per image of the stream; the forwards held `batch` images
        finally:
            seg.close()
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Report


def _fmt_num(v: float | None, digits: int = 0) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def _fmt_rate(row: Row) -> str:
    return "–" if row.seconds_per_image is None else f"{1.0 / row.seconds_per_image:.2f}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(devices: list[str]) -> list[str]:
    """Markdown bullet lines describing the machine and software."""
    import open_clip
    import timm

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    lines = [
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores ({usable} usable), "
        f"torch threads {torch.get_num_threads()}",
        f"- Software: Python {platform.python_version()}, torch {torch.__version__}, open_clip "
        f"{open_clip.__version__}, timm {timm.__version__}, {platform.system()} {platform.release()}",
    ]
    try:
        # Other processes on the machine slow CPU rows down; the load average says whether it was idle.
        lines.append("- Load average at the end (1/5/15 min): " + " / ".join(f"{v:.1f}" for v in os.getloadavg()))
    except (AttributeError, OSError):
        pass
    if any(d.startswith("cuda") for d in devices):
        props = torch.cuda.get_device_properties(0)
        lines.append(f"- GPU: {torch.cuda.get_device_name(0)}, {props.total_memory / 2**30:.0f} GiB, CUDA "
                     f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    else:
        lines.append("- GPU: none used" + (" (CUDA available)" if torch.cuda.is_available() else ""))
    return lines


def report(rows: list[Row], args: argparse.Namespace, devices: list[str], vocab: Vocabulary, n_windows: int,
           resized: tuple[int, int], templates: int) -> str:
    """The Markdown section: machine, protocol, one table, CASS overhead per device/dtype."""
    when = datetime.datetime.now().strftime("%Y-%m-%d")
    where = torch.cuda.get_device_name(0) if any(d.startswith("cuda") for d in devices) else _cpu_model()
    out = [f"## {where}: {', '.join(devices)} ({when})", ""]
    out += describe_machine(devices)
    h, w = args.size
    out += [
        f"- Models: open_clip `{CLIP_NAME}` + timm `{VFM_NAME}`, random weights",
        f"- Protocol: {h}×{w} RGB images resized to {resized[0]}×{resized[1]} (short side 336), {n_windows} windows "
        "of 224 (stride 112) in batches of 8, no PAMR; vocabulary "
        f"`{args.vocabulary}` ({vocab.num_classes} classes, {vocab.num_queries} queries); text embeddings "
        f"({templates} template{'s' if templates != 1 else ''}) computed once, outside the timing",
        f"- Timing: {args.warmup} warm-up image(s), then the mean over "
        + ", ".join(f"{args.cpu_images if d == 'cpu' else args.cuda_images} timed images on {d}" for d in devices)
        + ", one image at a time (batch 1: `segment`); batch b > 1: `segment_many` with the windows of b images "
        "per forward (window batch 8·b), timed over at least two batches after an untimed one",
        "- Memory: on CUDA `torch.cuda.max_memory_allocated()` during the timed images (tensors only, no CUDA "
        "context / allocator cache); Δ = peak − allocated before (≈ activations). On CPU the process RSS "
        "(resident set, sampled every 2 ms), Δ = peak − RSS before; RSS includes the weights and allocator slack, "
        "so Δ is the comparable number",
        "",
        "| method | device | dtype | batch | images/s | ms/image | × CLIP forward | × (CLIP + VFM forwards) "
        "| peak mem (MiB) | Δ mem (MiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.device, r.dtype), []).append(r)
    overheads = []
    for (device, dtype), group in groups.items():
        by_name = {(r.method, r.batch): r for r in group}
        for r in group:
            if r.error:
                out.append(f"| {r.method} | {device} | {dtype} | {r.batch} | failed: {r.error.replace('|', '/')} "
                           "| | | | | |")
                continue
            # forwards of the same batch size (the e2e stream is compared with the largest batched forwards)
            fb = r.batch if ("CLIP forward", r.batch) in by_name else max(
                [b for (m, b) in by_name if m == "CLIP forward"], default=1)
            fwd, vfm_fwd = by_name.get(("CLIP forward", fb)), by_name.get(("VFM forward", fb))
            ratio = (f"{r.seconds_per_image / fwd.seconds_per_image:.2f}"
                     if fwd is not None and fwd.seconds_per_image else "–")
            both = (f"{r.seconds_per_image / (fwd.seconds_per_image + vfm_fwd.seconds_per_image):.2f}"
                    if fwd is not None and vfm_fwd is not None and fwd.seconds_per_image and vfm_fwd.seconds_per_image
                    else "–")
            out.append(f"| {r.method} | {device} | {dtype} | {r.batch} | {_fmt_rate(r)} | "
                       f"{1000 * r.seconds_per_image:,.1f} | {ratio} | {both} | {_fmt_num(r.peak_mib)} | "
                       f"{_fmt_num(r.delta_mib)} |")
        fwd = by_name.get(("CLIP forward", 1))
        cass, vfm = by_name.get(("CASS", 1)), by_name.get(("VFM forward", 1))
        if all(x is not None and x.seconds_per_image for x in (cass, fwd, vfm)):
            two = fwd.seconds_per_image + vfm.seconds_per_image
            overheads.append(f"- {device} {dtype}: CASS {1000 * cass.seconds_per_image:,.1f} ms/image vs CLIP + VFM "
                             f"forwards {1000 * two:,.1f} ms → overhead ratio **{cass.seconds_per_image / two:.2f}×**")
    if overheads:
        out += ["", "CASS overhead over its two forwards (CLIP forward + VFM forward on the same windows):", ""]
        out += overheads
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto",
                   help="auto (CPU, plus CUDA when available), cpu, cuda, or a comma list (default: auto)")
    p.add_argument("--dtypes", default=None,
                   help="comma list of fp32,fp16,bf16 (default: fp32 on CPU; fp32,fp16,bf16 on CUDA)")
    p.add_argument("--images", type=int, default=None, help="timed images per row (default: 3 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up images per row (default 1)")
    p.add_argument("--size", type=lambda s: tuple(int(v) for v in s.lower().split("x")), default=(375, 500),
                   metavar="HxW", help="image size (default 375x500, a typical VOC image)")
    p.add_argument("--vocabulary", default="voc21", help="built-in vocabulary (default voc21)")
    p.add_argument("--templates", type=int, default=None,
                   help="prompt templates for the (untimed) text embeddings (default: 80 on CUDA, 1 on CPU-only runs, "
                        "where 80 templates of a full-size text tower take minutes)")
    p.add_argument("--methods", default=None,
                   help="comma list to restrict the rows (clip-forward, vfm-forward, clip, <baselines>, cass, "
                        "trident)")
    p.add_argument("--out", type=Path, default=None,
                   help="also write the Markdown to this file (default: print only), e.g. docs/benchmarks.md")
    p.add_argument("--append", action="store_true", help="with --out: append a section instead of overwriting")
    p.add_argument("--batch-sizes", default=None,
                   help="comma list of segment_many batch sizes for the multi-image rows (default: 1,8,32 on CUDA, "
                        "1 on CPU-only runs; 1 is segment() one image at a time)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of the CASS e2e row (default 4)")
    p.add_argument("--compile", action="store_true", help="add a CASS row with Segmenter(compile=True)")
    p.add_argument("--trident-sam", default="vit_b", choices=("vit_b", "vit_l", "vit_h", "test"),
                   help="SAM of the Trident rows (benchmarks/trident.py: CLIP, + DINO, + SAM, + refinement at 448²); "
                        "they run on CUDA, and on the CPU only when --methods names 'trident' (SAM-B at 1024² takes "
                        "about a minute per image on 2 cores)")
    args = p.parse_args(argv)
    if args.append and args.out is None:
        p.error("--append needs --out (the file to append to)")

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "auto" else [
        d.strip() for d in args.device.split(",")]
    if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    args.cpu_images = args.images or 3
    args.cuda_images = args.images or 20
    if args.templates is None:
        args.templates = 80 if any(d.startswith("cuda") for d in devices) else 1
    templates = tuple(IMAGENET_TEMPLATES[: args.templates])
    vocab = Vocabulary.builtin(args.vocabulary)
    methods = {m.strip().lower() for m in args.methods.split(",")} if args.methods else None
    cuda_run = any(d.startswith("cuda") for d in devices)
    batch_sizes = tuple(int(b) for b in (args.batch_sizes or ("1,8,32" if cuda_run else "1")).split(","))

    cfg = resolve_config("cass-official", **PROTOCOL)
    from cass_plugins.pipeline.image import rescaled_size

    resized = rescaled_size(args.size[0], args.size[1], cfg.short_side, cfg.max_long_side)
    n_windows = len(window_grid(resized[0], resized[1], cfg.crop, cfg.stride))

    rows: list[Row] = []
    for device in devices:
        default = ["fp32"] if device == "cpu" else ["fp32", "fp16", "bf16"]
        dtypes = [d.strip() for d in args.dtypes.split(",")] if args.dtypes else default
        n = args.cpu_images if device == "cpu" else args.cuda_images
        for dtype in dtypes:
            rows += run_device(device, dtype, n, args.warmup, args.size, vocab, templates, methods, batch_sizes,
                               args.workers, args.compile)
    trident_sections = []
    for device in devices:
        if (methods is None and device.startswith("cuda")) or (methods is not None and "trident" in methods):
            import trident  # benchmarks/trident.py: Trident's Table 8 breakdown, its own models and image size

            dtype = "fp16" if device.startswith("cuda") else "fp32"  # Table 8 is fp16
            n = args.cpu_images if device == "cpu" else args.cuda_images
            tri_args = argparse.Namespace(device=device, precision=dtype, sam=args.trident_sam, images=n,
                                          size=(448, 448))
            tri_rows = trident.run(device, dtype, args.trident_sam, n, args.warmup, (448, 448),
                                   Vocabulary.builtin(args.vocabulary, method="proxyclip"))
            trident_sections.append(trident.report(tri_rows, tri_args))

    section = "\n\n".join([report(rows, args, devices, vocab, n_windows, resized, len(templates)),
                            *trident_sections])
    print("\n" + section)
    if args.out is not None:
        write_report(args.out, section, append=args.append)
        print(f"written to {args.out}")
    return 0


def write_report(out: Path, section: str, append: bool = False) -> None:
    """Write ``section`` under the benchmarks header to ``out``, or append it to an existing file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Benchmarks\n\nGenerated by `python benchmarks/suite.py` (see its docstring for what each row "
              "measures). Random weights: the numbers are speed and memory only.\n\n")
    if append and out.exists():
        out.write_text(out.read_text().rstrip("\n") + "\n\n" + section)
    else:
        out.write_text(header + section)


if __name__ == "__main__":
    sys.exit(main())
