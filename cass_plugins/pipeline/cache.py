"""Persistent on-disk cache of text embeddings (one file per text tower × tokenizer × templates × precision).

Each file holds one float32 row per query, so a vocabulary that shares queries with a cached one only encodes
the new ones. Keys are content hashes, not names: the bytes of every text-side tensor of the model, the
tokenizer's class, context length and vocabulary, and the exact template strings. Renaming a checkpoint hits
the cache; changing one weight misses it.

Location: ``$CASS_PLUGINS_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/cass_plugins``, else
``~/.cache/cass_plugins``. ``CASS_PLUGINS_NO_CACHE=1`` disables it (for commands without a ``--no-cache`` flag).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import types
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "cache_dir", "cache_disabled_by_env", "text_tower_hash", "text_tower_version", "tokenizer_hash", "DiskTextCache",
]

log = logging.getLogger(__name__)

_FORMAT = 1  # bump when the file layout changes: old files are then ignored (and rewritten)

# Attributes of an open_clip ``CLIP`` / OpenAI ``clip`` model that make up the text tower (``encode_text``).
_TEXT_TENSORS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
# Non-tensor settings of open_clip's text tower that change ``encode_text``'s output.
_TEXT_SETTINGS = ("text_pool_type", "text_eos_id", "pad_id", "context_length")


def cache_dir() -> Path:
    """The cache folder: ``$CASS_PLUGINS_CACHE_DIR``, else ``$XDG_CACHE_HOME/cass_plugins``, else ``~/.cache/...``."""
    override = os.environ.get("CASS_PLUGINS_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore relative paths
        return Path(xdg) / "cass_plugins"
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "cass_plugins" / "cache"
    return Path.home() / ".cache" / "cass_plugins"


def cache_disabled_by_env() -> bool:
    """Whether ``CASS_PLUGINS_NO_CACHE`` is set to a true value (1, true, yes, on)."""
    return os.environ.get("CASS_PLUGINS_NO_CACHE", "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------------------- hashing
def _text_side(model: torch.nn.Module) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """The named tensors and settings ``model.encode_text`` depends on."""
    text = getattr(model, "text", None)
    if isinstance(text, torch.nn.Module):  # open_clip CustomTextCLIP (HF / custom text towers)
        named = list(text.state_dict(keep_vars=True).items())
        named += [(f"buffer:{n}", b) for n, b in text.named_buffers()]  # non-persistent ones (e.g. attn_mask)
        settings = {k: repr(getattr(text, k)) for k in _TEXT_SETTINGS if hasattr(text, k)}
        return named, settings
    if all(hasattr(model, a) for a in ("token_embedding", "transformer", "ln_final")):  # open_clip CLIP / OpenAI
        named = []
        for attr in _TEXT_TENSORS:
            value = getattr(model, attr, None)
            if isinstance(value, torch.nn.Module):
                named += [(f"{attr}.{n}", t) for n, t in value.state_dict(keep_vars=True).items()]
            elif isinstance(value, torch.Tensor):
                named.append((attr, value))
        settings = {k: repr(getattr(model, k)) for k in _TEXT_SETTINGS if hasattr(model, k)}
        return named, settings
    # Anything else: every tensor of the model (safe: it may cost a miss when only the image side changes).
    named = list(model.state_dict(keep_vars=True).items())
    named += [(f"buffer:{n}", b) for n, b in model.named_buffers()]
    return named, {}


def _fingerprint(tensors: Iterable[torch.Tensor]) -> tuple:
    # Storage address + autograd version counter: changes on any in-place update (optimiser step, copy_,
    # load_state_dict) or re-assignment of .data, so the memoised hash never goes stale; costs microseconds.
    return tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape), str(t.device)) for t in tensors)


def text_tower_version(model: Any) -> tuple | None:
    """Cheap token that changes whenever a text-side tensor is replaced or updated in place (``None``: no module)."""
    if not isinstance(model, torch.nn.Module):
        return None
    return _fingerprint(t for _, t in _text_side(model)[0])


_TOWER_HASHES: weakref.WeakKeyDictionary[Any, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def text_tower_hash(model: Any) -> str | None:
    """SHA-256 over the bytes, names, dtypes and shapes of the text tower's tensors (``None``: not a module).

    Memoised per model object and recomputed only when a tensor changed (new storage or in-place update), so
    calling it once per vocabulary is cheap. Hashing a ViT-B/16 text tower (~250 MB of float32) takes ~0.2 s.
    """
    if not isinstance(model, torch.nn.Module):
        return None
    named, settings = _text_side(model)
    fingerprint = _fingerprint(t for _, t in named)
    memo = _TOWER_HASHES.get(model)
    if memo is not None and memo[0] == fingerprint:
        return memo[1]
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    for name, t in named:
        t = t.detach()
        h.update(f"\0{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        # The raw bytes (viewed as uint8, so bf16 and friends work too); ``contiguous`` only copies strided views.
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    digest = h.hexdigest()
    _TOWER_HASHES[model] = (fingerprint, digest)
    return digest


_TOKENIZER_HASHES: dict[int, tuple[Any, str]] = {}


def _callable_name(obj: Any) -> str:
    # Stable across processes (no addresses): module + qualified name of the function or of the class.
    if isinstance(obj, functools.partial):
        return f"partial({_callable_name(obj.func)}, {obj.args!r}, {sorted(obj.keywords.items())!r})"
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def tokenizer_hash(tokenizer: Any) -> str:
    """Identity of a tokenizer: class name, context length and (when exposed) a hash of its vocabulary.

    open_clip's ``SimpleTokenizer`` exposes ``encoder`` (token → id) and HF tokenizers ``get_vocab()``; plain
    functions (``open_clip.tokenize``) are identified by module and name. Memoised per object.
    """
    memo = _TOKENIZER_HASHES.get(id(tokenizer))
    if memo is not None and memo[0] is tokenizer:  # the object is held in the memo: its id cannot be reused
        return memo[1]
    parts: dict[str, Any] = {"class": _callable_name(tokenizer),
                             "context_length": getattr(tokenizer, "context_length", None)}
    vocab: Mapping[str, int] | None = getattr(tokenizer, "encoder", None)
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers tokenizer
    if vocab is None and inner is not None and hasattr(inner, "get_vocab"):
        vocab = inner.get_vocab()
    if isinstance(vocab, Mapping):
        # ~50 ms for CLIP's 49k-entry BPE vocabulary, once per tokenizer object.
        parts["vocab"] = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()
    _TOKENIZER_HASHES[id(tokenizer)] = (tokenizer, digest)
    return digest


# ---------------------------------------------------------------------------------------------------- files
class DiskTextCache:
    """Per-query text embeddings stored under ``directory`` (default: :func:`cache_dir`).

    One file per (text tower, tokenizer, templates, precision, device type); rows are keyed by the exact query
    string. Files are written atomically (temp file + ``os.replace``) and read with ``weights_only=True``; an
    unreadable or malformed file is ignored with a warning and rewritten on the next store.

    Args:
        directory: where the files live; default: :func:`cache_dir` at the time of each call.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self._directory = Path(directory) if directory is not None else None

    @property
    def directory(self) -> Path:
        """The folder holding the cache files."""
        return self._directory if self._directory is not None else cache_dir()

    def path(self, key: Mapping[str, Any]) -> Path:
        """The file for ``key`` (a JSON-able mapping naming model hash, tokenizer, templates, ...)."""
        digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()
        return self.directory / f"text-{digest[:40]}.pt"

    def load(self, key: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Query → (d,) float32 row for every query stored under ``key`` (empty when none or unreadable)."""
        path = self.path(key)
        if not path.is_file():
            return {}
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("key") != dict(key):
                raise ValueError("unexpected content")
            queries, emb = data["queries"], data["embeddings"]
            if (not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.dtype != torch.float32
                    or not isinstance(queries, list) or len(queries) != emb.shape[0]
                    or not all(isinstance(q, str) for q in queries)):
                raise ValueError("malformed embeddings")
        except Exception as err:  # any damage (truncated file, foreign pickle, ...): recompute, never crash
            warnings.warn(f"ignoring unreadable text-embedding cache file {path} ({err}); it will be rewritten",
                          RuntimeWarning, stacklevel=3)
            return {}
        return dict(zip(queries, emb.unbind(0)))

    def store(self, key: Mapping[str, Any], rows: Mapping[str, torch.Tensor]) -> None:
        """Add ``rows`` (query → (d,) float32) to the file of ``key``; failures to write are logged, not raised."""
        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Re-read just before writing: another process may have added queries since our lookup.
            merged = self.load(key)
            merged.update(rows)
            queries = list(merged)
            payload = {
                "format": _FORMAT, "key": dict(key), "queries": queries,
                "embeddings": torch.stack([merged[q].detach().to("cpu", torch.float32) for q in queries]),
            }
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    torch.save(payload, f)
                os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as err:  # read-only home, full disk: the embeddings are still returned
            log.warning("could not write the text-embedding cache %s: %s", path, err)


def make_key(model_hash: str, tokenizer_id: str, templates: Sequence[str], precision: str, device_type: str) -> dict:
    """The JSON-able key of one cache file."""
    return {
        "model": model_hash, "tokenizer": tokenizer_id, "templates": list(templates), "precision": precision,
        # CPU and GPU kernels round differently: keep their results apart so a hit equals a fresh computation.
        "device": device_type,
    }
