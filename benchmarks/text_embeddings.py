"""Text-embedding throughput: per-prompt and per-class loops vs batched ``encode_text`` vs the on-disk cache.

Uses a full-size ViT-B/16 text tower with random weights (``open_clip.create_model("ViT-B-16", pretrained=None)``:
the cost does not depend on the weights) and the first name of each VOC21 class × the 80 ImageNet templates.
Everything runs in one process, one after the other, so the rates are comparable. Prints a Markdown table to
stdout; ``--out FILE`` also writes it there (never a tracked file by default).

    python benchmarks/text_embeddings.py                    # 21 classes x 80 templates, ~15 min on 2 CPU cores
    python benchmarks/text_embeddings.py --classes 4 --sweep 1,16,64,256
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cass_plugins.pipeline import cache as cache_module  # noqa: E402
from cass_plugins.pipeline.templates import IMAGENET_TEMPLATES  # noqa: E402
from cass_plugins.pipeline.text import DEFAULT_BATCH_SIZE, TextEmbeddingCache, default_tokenizer, encode_text  # noqa: E402
from cass_plugins.pipeline.vocabulary import Vocabulary  # noqa: E402


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def per_prompt(model: torch.nn.Module, tok: Callable, queries: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    """The naive loop: one ``encode_text`` call per prompt."""
    rows = []
    for q in queries:
        embs = torch.cat([F.normalize(model.encode_text(tok([t.format(q)])).float(), dim=-1) for t in templates])
        rows.append(F.normalize(embs.mean(0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def per_class(model: torch.nn.Module, tok: Callable, queries: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    """One ``encode_text`` call per class (all its templates), as the authors' ``zeroshot_classifier`` loops."""
    rows = []
    for q in queries:
        embs = F.normalize(model.encode_text(tok([t.format(q) for t in templates])).float(), dim=-1)
        rows.append(F.normalize(embs.mean(0), dim=-1))
    return torch.stack(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=21, help="number of VOC21 class names (default: %(default)s)")
    p.add_argument("--templates", type=int, default=80, help="templates per class (default: %(default)s)")
    p.add_argument("--per-prompt-classes", type=int, default=2,
                   help="classes timed with the per-prompt loop (slow; rate only) (default: %(default)s)")
    p.add_argument("--sweep", default="", help="comma-separated batch sizes to time on --sweep-classes classes")
    p.add_argument("--sweep-classes", type=int, default=4, help="classes per sweep point (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="batched path (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import open_clip

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no pretrained weights": intended
        model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    tok = default_tokenizer("ViT-B-16")
    names = [c[0] for c in Vocabulary.builtin("voc21").classes]
    queries = [names[i % len(names)] + ("" if i < len(names) else f" {i}") for i in range(args.classes)]
    templates = tuple(IMAGENET_TEMPLATES[: args.templates])
    n_prompts = len(queries) * len(templates)
    results: list[tuple[str, int, float]] = []  # (path, prompts, seconds)

    def record(name: str, prompts: int, seconds: float) -> None:
        results.append((name, prompts, seconds))
        print(f"  {name}: {prompts} prompts in {seconds:.2f} s = {prompts / seconds:.2f} prompts/s",
              file=sys.stderr, flush=True)

    with torch.no_grad():
        model.encode_text(tok(["warm-up"] * 8))
    k = min(args.per_prompt_classes, len(queries))
    if k:
        record("per-prompt loop (batch 1)", k * len(templates), _timed(lambda: per_prompt(model, tok, queries[:k], templates)))
    reference = None

    def run_per_class() -> None:
        nonlocal reference
        reference = per_class(model, tok, queries, templates)

    record("per-class loop (old path)", n_prompts, _timed(run_per_class))
    for bs in [int(b) for b in args.sweep.split(",") if b.strip()]:
        sub = queries[: args.sweep_classes]
        record(f"batched, batch {bs} (sweep)", len(sub) * len(templates),
               _timed(lambda: encode_text(model, tok, sub, templates, batch_size=bs, cache=False, progress=False)))

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CASS_PLUGINS_CACHE_DIR"] = tmp
        os.environ.pop("CASS_PLUGINS_NO_CACHE", None)
        out: dict[str, torch.Tensor] = {}

        def batched() -> None:  # fresh memory cache: the run computes and fills the disk cache
            out["fresh"] = encode_text(model, tok, queries, templates, batch_size=args.batch_size,
                                       cache=TextEmbeddingCache(), progress=False)

        record(f"batched encode_text (batch {args.batch_size}), writes cache", n_prompts, _timed(batched))

        def cold_hit() -> None:  # as in a new process: text tower hashed again, file read from disk
            cache_module._TOWER_HASHES.clear()
            cache_module._TOKENIZER_HASHES.clear()
            out["cold"] = encode_text(model, tok, queries, templates, cache=TextEmbeddingCache(), progress=False)

        def warm_hit() -> None:  # same model object: memoised hash, file read from disk
            out["warm"] = encode_text(model, tok, queries, templates, cache=TextEmbeddingCache(), progress=False)

        record("disk cache hit, new process (hash + load)", n_prompts, _timed(cold_hit))
        record("disk cache hit, same model object (load)", n_prompts, _timed(warm_hit))
        assert torch.equal(out["cold"], out["fresh"]) and torch.equal(out["warm"], out["fresh"]), "cache not exact"
    diff = (out["fresh"] - reference).abs().max().item()

    lines = [
        f"Text embeddings, ViT-B/16 text tower (random weights), {len(queries)} classes x {len(templates)} templates"
        f" = {n_prompts} prompts; torch {torch.__version__}, {torch.get_num_threads()} threads,"
        f" {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs.",
        "",
        "| path | prompts | seconds | prompts/s | vs per-class |",
        "|---|---:|---:|---:|---:|",
    ]
    base = next(n / s for name, n, s in results if name.startswith("per-class"))
    for name, n, s in results:
        lines.append(f"| {name} | {n} | {s:.2f} | {n / s:.1f} | {n / s / base:.2f}x |")
    lines += ["", f"max |batched - per-class| = {diff:.2e}; cache hits bit-identical to the fresh result."]
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
