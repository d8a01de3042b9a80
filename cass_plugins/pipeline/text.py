"""Text classifier: one L2-normalised embedding per query, averaged over the 80 prompt templates (cass.md §4).

Only the text tower is touched (``model.encode_text``), so this works with open_clip models, OpenAI-``clip``
models and any object exposing ``encode_text(tokens) -> (n, d)``.

Results are cached twice: in memory per model object (:class:`TextEmbeddingCache`) and on disk per content hash
of the text tower (:mod:`cass_plugins.pipeline.cache`), so a second run of a program does not re-encode its vocabulary.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from cass_plugins.pipeline.cache import (
    DiskTextCache, cache_disabled_by_env, make_key, text_tower_hash, text_tower_version, tokenizer_hash,
)
from cass_plugins.pipeline.templates import IMAGENET_TEMPLATES
from cass_plugins.pipeline.vocabulary import Vocabulary

__all__ = [
    "encode_text", "default_tokenizer", "TextEmbeddingCache", "DEFAULT_BATCH_SIZE", "IMAGENET_TEMPLATES", "Vocabulary",
]

Precision = Literal["float32", "model"]

# Prompts per encode_text call. On a 2-core CPU (ViT-B/16 text tower) every batch of 32 or more runs at the same
# speed within noise, ~9x one-prompt calls (docs/benchmarks.md, "Text embeddings"); GPUs gain from large batches,
# and 256 keeps results bit-identical to earlier versions, which used it too.
DEFAULT_BATCH_SIZE = 256


@functools.lru_cache(maxsize=8)
def default_tokenizer(model_name: str | None = None) -> Callable[..., torch.Tensor]:
    """open_clip's tokenizer for ``model_name`` (CLIP BPE, context 77 when ``None`` or unknown).

    OpenAI-style names (``"ViT-B/16"``) are mapped to open_clip's (``"ViT-B-16"``). The result is cached: the
    BPE vocabulary takes a moment to load.
    """
    import open_clip

    if not model_name:
        return open_clip.SimpleTokenizer()
    if ":" not in model_name:  # no 'hf-hub:'/'local-dir:' schema: a plain model name
        model_name = model_name.replace("/", "-")
        if open_clip.get_model_config(model_name) is None:
            # Unknown to open_clip: its fallback would be the same tokenizer, plus a warning.
            return open_clip.SimpleTokenizer()
    return open_clip.get_tokenizer(model_name)


class TextEmbeddingCache:
    """Text embeddings keyed by (model, tokenizer, queries, templates, precision).

    Models are held weakly (a dropped model frees its entries); the tokenizer is held strongly so that its
    ``id`` in the key cannot be reused by another object. Entries are kept per model in LRU order.
    :func:`encode_text` passes a ``version`` (storage addresses and version counters of the text-side tensors),
    so in-place weight updates through torch ops miss the cache; call :meth:`clear` after other kinds of edits.

    Args:
        max_entries_per_model: vocabularies kept per model.
    """

    def __init__(self, max_entries_per_model: int = 32) -> None:
        self.max_entries_per_model = max_entries_per_model
        self._store: weakref.WeakKeyDictionary[Any, OrderedDict[tuple, tuple[Any, torch.Tensor]]] = (
            weakref.WeakKeyDictionary())

    @staticmethod
    def _key(tokenizer: Any, queries: tuple[str, ...], templates: tuple[str, ...], precision: str,
             version: Hashable) -> tuple:
        return (id(tokenizer), queries, templates, precision, version)

    def get(self, model: Any, tokenizer: Any, queries: tuple[str, ...], templates: tuple[str, ...],
            precision: str, version: Hashable = None) -> torch.Tensor | None:
        """The cached (num_queries, d) tensor, or ``None``."""
        try:
            entries = self._store.get(model)
        except TypeError:  # not weak-referenceable: never cached
            return None
        if entries is None:
            return None
        key = self._key(tokenizer, queries, templates, precision, version)
        hit = entries.get(key)
        if hit is None or hit[0] is not tokenizer:
            return None
        entries.move_to_end(key)
        return hit[1]

    def put(self, model: Any, tokenizer: Any, queries: tuple[str, ...], templates: tuple[str, ...],
            precision: str, value: torch.Tensor, version: Hashable = None) -> None:
        """Store ``value`` (silently skipped for models that cannot be weakly referenced)."""
        try:
            entries = self._store.setdefault(model, OrderedDict())
        except TypeError:
            return
        entries[self._key(tokenizer, queries, templates, precision, version)] = (tokenizer, value)
        while len(entries) > self.max_entries_per_model:
            entries.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry."""
        self._store = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return sum(len(v) for v in self._store.values())


DEFAULT_TEXT_CACHE = TextEmbeddingCache()


def _module_device(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for t in model.parameters():
            return t.device
    return torch.device("cpu")


class _Float32Weights:
    """Context manager running an fp16/bf16 module in float32, then restoring every tensor's original dtype.

    The original storages are put back on exit (not re-cast copies), so the model comes back bit-identical and
    at the same addresses, which keeps the memoised text-tower hash valid. Tensors that were already float32
    (e.g. open_clip's fp32 LayerNorms in mixed precision) are left alone. Not thread-safe with concurrent use of
    the same model.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> None:
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.dtype in (torch.float16, torch.bfloat16):
                self.saved.append((t, t.data))
                t.data = t.data.float()

    def __exit__(self, *exc: object) -> None:
        for t, original in self.saved:
            t.data = original
        self.saved.clear()


def _has_low_precision_weights(model: Any) -> bool:
    if not isinstance(model, torch.nn.Module):
        return False
    tensors = list(model.parameters()) + list(model.buffers())
    return any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors)


def _stderr_is_terminal() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def _progress_bar(total: int, progress: bool | None) -> Any:
    """A tqdm bar over ``total`` prompts, or ``None`` (off, or auto-mode without a terminal on stderr)."""
    if progress is False or (progress is None and not _stderr_is_terminal()):
        return None
    from tqdm import tqdm

    # Auto mode: only runs still busy after a second show a bar (delay), so cache hits and tiny
    # vocabularies stay silent; progress=True shows it at once.
    return tqdm(total=total, desc="text embeddings", unit="prompt", delay=0.0 if progress else 1.0,
                file=sys.stderr, dynamic_ncols=True)


def _check_truncation(tokenizer: Callable[..., torch.Tensor], tokens: torch.Tensor, prompts: list[str],
                      queries: Sequence[str], templates: Sequence[str]) -> None:
    """Raise if a prompt does not fit the tokenizer's context (it would be cut silently).

    Detection without knowing the tokenizer's padding or end token: tokenize again with one more position. A
    prompt that fits gives the same ids plus one pad; a truncated one differs at the last position (its end
    token was forced there). Tokenizers without a ``context_length`` argument are not checked (OpenAI's
    ``clip.tokenize`` raises by itself).
    """
    length = tokens.shape[-1]
    try:
        longer = tokenizer(prompts, context_length=length + 1)
    except TypeError:
        return
    if not isinstance(longer, torch.Tensor) or longer.shape != (len(prompts), length + 1):
        return
    cut = (longer[:, :length] != tokens.to(longer.device)).any(dim=1).nonzero().flatten().tolist()
    if not cut:
        return
    lines = []
    for i in cut[:5]:
        query, template = queries[i // len(templates)], templates[i % len(templates)]
        count = ""
        if callable(getattr(tokenizer, "encode", None)):  # open_clip's SimpleTokenizer: ids without start/end
            count = f", {len(tokenizer.encode(prompts[i])) + 2} tokens"
        lines.append(f"class {query!r} with template {template!r} ({prompts[i]!r}{count})")
    more = f" and {len(cut) - 5} more" if len(cut) > 5 else ""
    raise ValueError(
        f"prompt longer than the tokenizer's context of {length} tokens: " + "; ".join(lines) + more
        + ". It would be truncated, and names that differ only after the cut would get the same embedding; "
        "shorten the class name (or the template)."
    )


def _encode_queries(
    model: Any, tokenizer: Callable[..., torch.Tensor], queries: Sequence[str], templates: tuple[str, ...],
    batch_size: int, device: torch.device, precision: str, progress: bool | None,
) -> torch.Tensor:
    """(len(queries), d) float32: per query the normalised mean of its normalised template embeddings."""
    prompts = [t.format(q) for q in queries for t in templates]  # query-major: reshape to (Q, T, d) below
    tokens = tokenizer(prompts)  # all at once: cheap next to the encoder, and needed for the length check
    _check_truncation(tokenizer, tokens, prompts, queries, templates)
    upcast = precision == "float32" and _has_low_precision_weights(model)
    bar = _progress_bar(len(prompts), progress)
    chunks = []
    try:
        with _Float32Weights(model) if upcast else contextlib.nullcontext():
            for start in range(0, len(prompts), batch_size):
                emb = model.encode_text(tokens[start:start + batch_size].to(device)).float()
                chunks.append(F.normalize(emb, dim=-1))
                if bar is not None:
                    bar.update(emb.shape[0])
    finally:
        if bar is not None:
            bar.close()
    per_template = torch.cat(chunks).view(len(queries), len(templates), -1)
    return F.normalize(per_template.mean(dim=1), dim=-1)


@torch.no_grad()
def encode_text(
    model: Any,
    tokenizer: Callable[..., torch.Tensor],
    vocabulary: Vocabulary | str | Sequence[str | Sequence[str]],
    templates: Sequence[str] = IMAGENET_TEMPLATES,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
    precision: Precision = "float32",
    cache: TextEmbeddingCache | bool | None = True,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """Embed every query of ``vocabulary`` (cass.md §4, protocol.md §3).

    For each query and each template: ``model.encode_text(tokenizer([template.format(query)]))``, L2-normalised;
    the mean over templates is L2-normalised again. Prompts of all queries are encoded together in batches of
    ``batch_size`` (the result does not depend on it beyond float32 rounding).

    Args:
        model: anything with ``encode_text(tokens) -> (n, d)`` (open_clip, OpenAI clip, custom).
        tokenizer: maps a list of strings to a LongTensor of token ids (e.g. :func:`default_tokenizer`).
        vocabulary: a :class:`Vocabulary` or anything :meth:`Vocabulary.parse` accepts.
        templates: ``str.format`` patterns with one ``{}`` placeholder.
        batch_size: prompts per ``encode_text`` call.
        device: where the tokens go and the result lives; default: the model's device.
        precision: ``"float32"`` (default) runs an fp16/bf16 ``nn.Module`` temporarily in float32 and restores
            its tensors exactly afterwards, because the Ward cut at small thresholds (h=0.02) flips with the
            precision of the embeddings (cass.md §9). ``"model"`` runs it in its own dtype (the authors' fp16
            text tower); the normalising and averaging are done in float32 either way.
        cache: ``True`` (default): the in-memory :data:`DEFAULT_TEXT_CACHE` plus the on-disk cache
            (:mod:`cass_plugins.pipeline.cache`; queries already stored for this text tower, tokenizer, templates and
            precision are loaded, only the others are encoded). A :class:`TextEmbeddingCache`: that one plus the
            disk. ``False``/``None``: no caching at all (nothing read or written).
        cache_dir: folder of the on-disk cache; default: :func:`cass_plugins.pipeline.cache.cache_dir`.
        progress: tqdm bar over the prompts on stderr. ``None`` (default): only when stderr is a terminal and
            the encoding is still running after a second; ``True``: always; ``False``: never.

    Returns:
        float32 tensor of shape (num_queries, d), rows of unit norm (a fresh copy: safe to modify). Rows read
        from the disk cache are bit-identical to the ones computed when they were stored.

    Raises:
        ValueError: bad arguments, or a prompt longer than the tokenizer's context (named by class and
            template): truncating it would silently change which text is encoded.
    """
    if precision not in ("float32", "model"):
        raise ValueError(f"precision must be 'float32' or 'model', got {precision!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    vocab = Vocabulary.parse(vocabulary)
    templates = tuple(templates)
    if not templates:
        raise ValueError("no templates: pass at least one, e.g. ('a photo of a {}.',)")
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"template {t!r} has no '{{}}' placeholder")
    queries = vocab.queries
    device = torch.device(device) if device is not None else _module_device(model)

    memory = DEFAULT_TEXT_CACHE if cache is True else cache if isinstance(cache, TextEmbeddingCache) else None
    version = text_tower_version(model)  # in-place weight updates must not hit stale entries
    if memory is not None:
        hit = memory.get(model, tokenizer, queries, templates, precision, version)
        if hit is not None:
            return hit.to(device, copy=True)

    rows: dict[str, torch.Tensor] = {}
    disk: DiskTextCache | None = None
    key: dict[str, Any] | None = None
    if cache is not None and cache is not False and not cache_disabled_by_env():
        model_hash = text_tower_hash(model)  # None for non-modules: they are not cached on disk
        if model_hash is not None:
            disk = DiskTextCache(cache_dir)
            key = make_key(model_hash, tokenizer_hash(tokenizer), templates, precision, device.type)
            stored = disk.load(key)
            rows = {q: stored[q] for q in queries if q in stored}

    missing = list(dict.fromkeys(q for q in queries if q not in rows))  # de-duplicated, in vocabulary order
    if missing:
        fresh = _encode_queries(model, tokenizer, missing, templates, batch_size, device, precision, progress)
        new_rows = dict(zip(missing, fresh.unbind(0)))
        rows.update(new_rows)
        if disk is not None and key is not None:
            disk.store(key, new_rows)
    result = torch.stack([rows[q].to(device) for q in queries])

    if memory is not None:
        memory.put(model, tokenizer, queries, templates, precision, result, version)
        return result.clone()
    return result
