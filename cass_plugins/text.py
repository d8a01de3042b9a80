"""Text classifier: one L2-normalised embedding per query, averaged over the 80 prompt templates (cass.md §4).

Only the text tower is touched (``model.encode_text``), so this works with open_clip models, OpenAI-``clip``
models and any object exposing ``encode_text(tokens) -> (n, d)``.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from cass_plugins.templates import IMAGENET_TEMPLATES
from cass_plugins.vocabulary import Vocabulary

__all__ = ["encode_text", "default_tokenizer", "TextEmbeddingCache", "IMAGENET_TEMPLATES", "Vocabulary"]

Precision = Literal["float32", "model"]


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
    ``id`` in the key cannot be reused by another object. Entries are kept per model in LRU order. The cache
    cannot see weight updates: call :meth:`clear` after changing a model's weights in place.

    Args:
        max_entries_per_model: vocabularies kept per model.
    """

    def __init__(self, max_entries_per_model: int = 32) -> None:
        self.max_entries_per_model = max_entries_per_model
        self._store: weakref.WeakKeyDictionary[Any, OrderedDict[tuple, tuple[Any, torch.Tensor]]] = (
            weakref.WeakKeyDictionary())

    @staticmethod
    def _key(tokenizer: Any, queries: tuple[str, ...], templates: tuple[str, ...], precision: str) -> tuple:
        return (id(tokenizer), queries, templates, precision)

    def get(self, model: Any, tokenizer: Any, queries: tuple[str, ...], templates: tuple[str, ...],
            precision: str) -> torch.Tensor | None:
        """The cached (num_queries, d) tensor, or ``None``."""
        try:
            entries = self._store.get(model)
        except TypeError:  # not weak-referenceable: never cached
            return None
        if entries is None:
            return None
        key = self._key(tokenizer, queries, templates, precision)
        hit = entries.get(key)
        if hit is None or hit[0] is not tokenizer:
            return None
        entries.move_to_end(key)
        return hit[1]

    def put(self, model: Any, tokenizer: Any, queries: tuple[str, ...], templates: tuple[str, ...],
            precision: str, value: torch.Tensor) -> None:
        """Store ``value`` (silently skipped for models that cannot be weakly referenced)."""
        try:
            entries = self._store.setdefault(model, OrderedDict())
        except TypeError:
            return
        entries[self._key(tokenizer, queries, templates, precision)] = (tokenizer, value)
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

    Casting fp16/bf16 → float32 → fp16/bf16 is exact, so the model comes back bit-identical; tensors that were
    already float32 (e.g. open_clip's fp32 LayerNorms in mixed precision) are left alone. Not thread-safe with
    concurrent use of the same model.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.saved: list[tuple[torch.Tensor, torch.dtype]] = []

    def __enter__(self) -> None:
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.dtype in (torch.float16, torch.bfloat16):
                self.saved.append((t, t.dtype))
                t.data = t.data.float()

    def __exit__(self, *exc: object) -> None:
        for t, dtype in self.saved:
            t.data = t.data.to(dtype)
        self.saved.clear()


def _has_low_precision_weights(model: Any) -> bool:
    if not isinstance(model, torch.nn.Module):
        return False
    tensors = list(model.parameters()) + list(model.buffers())
    return any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors)


@torch.no_grad()
def encode_text(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    vocabulary: Vocabulary | str | Sequence[str | Sequence[str]],
    templates: Sequence[str] = IMAGENET_TEMPLATES,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    precision: Precision = "float32",
    cache: TextEmbeddingCache | None = DEFAULT_TEXT_CACHE,
) -> torch.Tensor:
    """Embed every query of ``vocabulary`` (cass.md §4, protocol.md §3).

    For each query and each template: ``model.encode_text(tokenizer([template.format(query)]))``, L2-normalised;
    the mean over templates is L2-normalised again.

    Args:
        model: anything with ``encode_text(tokens) -> (n, d)`` (open_clip, OpenAI clip, custom).
        tokenizer: maps a list of strings to a LongTensor of token ids (e.g. :func:`default_tokenizer`).
        vocabulary: a :class:`Vocabulary` or anything :meth:`Vocabulary.parse` accepts.
        templates: ``str.format`` patterns with one ``{}`` placeholder.
        batch_size: prompts per ``encode_text`` call.
        device: where the tokens go and the result lives; default: the model's device.
        precision: ``"float32"`` (default) runs an fp16/bf16 ``nn.Module`` temporarily in float32 and restores
            its dtypes exactly afterwards, because the Ward cut at small thresholds (h=0.02) flips with the
            precision of the embeddings (cass.md §9). ``"model"`` runs it in its own dtype (the authors' fp16
            text tower); the normalising and averaging are done in float32 either way.
        cache: where to look up / store the result; ``None`` disables caching.

    Returns:
        float32 tensor of shape (num_queries, d), rows of unit norm (a fresh copy: safe to modify).
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

    if cache is not None:
        hit = cache.get(model, tokenizer, queries, templates, precision)
        if hit is not None:
            return hit.to(device, copy=True)

    upcast = precision == "float32" and _has_low_precision_weights(model)
    prompts = [t.format(q) for q in queries for t in templates]  # query-major: reshape to (Q, T, d) below
    chunks = []
    with _Float32Weights(model) if upcast else contextlib.nullcontext():
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start:start + batch_size]).to(device)
            emb = model.encode_text(tokens).float()
            chunks.append(F.normalize(emb, dim=-1))
    per_template = torch.cat(chunks).view(len(queries), len(templates), -1)
    result = F.normalize(per_template.mean(dim=1), dim=-1)

    if cache is not None:
        cache.put(model, tokenizer, queries, templates, precision, result)
        return result.clone()
    return result
