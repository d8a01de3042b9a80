"""On-disk text-embedding cache, batching, progress bar and the prompt-length check of ``encode_text``."""
from __future__ import annotations

import copy
import io
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cass_plugins.pipeline import cache as cache_module
from cass_plugins.pipeline.cache import DiskTextCache, cache_dir, text_tower_hash, tokenizer_hash
from cass_plugins.pipeline.text import TextEmbeddingCache, _progress_bar, default_tokenizer, encode_text
from conftest import TINY_CLIP, make_tiny_clip

TEMPLATES = ("a photo of a {}.", "itap of my {}.", "a {} in a video game.")


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(TINY_CLIP)


@pytest.fixture
def model() -> torch.nn.Module:
    return make_tiny_clip(seed=5)


@pytest.fixture
def cdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("CASS_PLUGINS_CACHE_DIR", str(d))
    return d


class _Counter:
    """Wraps ``model.encode_text`` and counts the prompts (rows) it is asked to encode."""

    def __init__(self, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        self.prompts = 0
        self.calls = 0
        real = model.encode_text

        def counting(tokens: torch.Tensor) -> torch.Tensor:
            self.prompts += tokens.shape[0]
            self.calls += 1
            return real(tokens)

        monkeypatch.setattr(model, "encode_text", counting)


def _encode(model, tok, vocab, templates=TEMPLATES, **kw) -> torch.Tensor:
    # A fresh in-memory cache each time, so that only the disk can answer (as in a new process).
    kw.setdefault("cache", TextEmbeddingCache())
    return encode_text(model, tok, vocab, templates, **kw)


def _files(d: Path) -> list[Path]:
    return sorted(d.glob("*.pt")) if d.exists() else []


def test_round_trip_is_bit_identical(model, tok, cdir, monkeypatch) -> None:
    fresh = _encode(model, tok, "cat; dog, puppy; sky")
    assert len(_files(cdir)) == 1
    counter = _Counter(model, monkeypatch)
    again = _encode(model, tok, "cat; dog, puppy; sky")
    assert counter.prompts == 0
    assert again.dtype == torch.float32 and torch.equal(again, fresh)
    # And equal to a computation that never saw a cache.
    assert torch.equal(encode_text(model, tok, "cat; dog, puppy; sky", TEMPLATES, cache=False), fresh)


def test_key_follows_text_weights_only(model, tok, cdir, monkeypatch) -> None:
    h0 = text_tower_hash(model)
    assert h0 == text_tower_hash(copy.deepcopy(model))  # content, not object identity
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.ln_final.bias[3] += 1e-4  # one parameter, one entry
    assert text_tower_hash(changed) != h0
    image_side = copy.deepcopy(model)
    with torch.no_grad():
        image_side.visual.conv1.weight.mul_(2)
    assert text_tower_hash(image_side) == h0  # the image tower does not change text embeddings

    fresh = _encode(model, tok, "cat")
    counter = _Counter(changed, monkeypatch)
    other = _encode(changed, tok, "cat")
    assert counter.prompts == len(TEMPLATES) and not torch.equal(other, fresh)
    assert len(_files(cdir)) == 2

    # In-place edit of the same object: the memoised hash notices (version counter), nothing stale is served.
    with torch.no_grad():
        model.text_projection[0, 0] += 1e-3
    assert text_tower_hash(model) != h0
    counter = _Counter(model, monkeypatch)
    _encode(model, tok, "cat", cache=True)  # default in-memory cache too
    assert counter.prompts == len(TEMPLATES)


def test_key_follows_templates_and_class_strings(model, tok, cdir, monkeypatch) -> None:
    _encode(model, tok, "cat; dog")
    counter = _Counter(model, monkeypatch)
    _encode(model, tok, "cat; dog", TEMPLATES[:2])  # other templates: another file, everything encoded
    assert counter.prompts == 2 * 2 and len(_files(cdir)) == 2
    counter.prompts = 0
    _encode(model, tok, "cat; dog", TEMPLATES[::-1])  # same set, other order: a different key (exact strings)
    assert counter.prompts == 2 * len(TEMPLATES)
    counter.prompts = 0
    _encode(model, tok, "Cat; dog")  # exact class strings: 'Cat' is not 'cat'
    assert counter.prompts == len(TEMPLATES)


def test_partial_reuse_encodes_only_new_queries(model, tok, cdir, monkeypatch) -> None:
    first = _encode(model, tok, "cat; dog; sky")
    counter = _Counter(model, monkeypatch)
    second = _encode(model, tok, "sky; bird, parrot; cat")
    assert counter.prompts == 2 * len(TEMPLATES)  # bird and parrot only
    assert torch.equal(second[0], first[2]) and torch.equal(second[3], first[0])
    counter.prompts = 0
    third = _encode(model, tok, "parrot; dog")  # all stored by now
    assert counter.prompts == 0 and torch.equal(third[0], second[2]) and torch.equal(third[1], first[1])
    assert len(_files(cdir)) == 1
    # The stored rows equal a fresh, cache-free computation of the same queries.
    torch.testing.assert_close(third, encode_text(model, tok, "parrot; dog", TEMPLATES, cache=False),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_corrupt_file_is_ignored_and_rewritten(model, tok, cdir, monkeypatch, damage) -> None:
    fresh = _encode(model, tok, "cat; dog")
    (path,) = _files(cdir)
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:  # loads fine, but is not ours
        torch.save({"format": 1, "queries": ["cat"], "embeddings": torch.zeros(3)}, path)
    counter = _Counter(model, monkeypatch)
    with pytest.warns(RuntimeWarning, match="unreadable text-embedding cache"):
        again = _encode(model, tok, "cat; dog")
    assert counter.prompts == 2 * len(TEMPLATES) and torch.equal(again, fresh)
    counter.prompts = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten: readable again
        assert torch.equal(_encode(model, tok, "cat; dog"), fresh)
    assert counter.prompts == 0


def test_unwritable_folder_still_returns(model, tok, tmp_path, monkeypatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("CASS_PLUGINS_CACHE_DIR", str(blocker / "sub"))  # a folder below a file: cannot exist
    out = _encode(model, tok, "cat")
    assert torch.equal(out, encode_text(model, tok, "cat", TEMPLATES, cache=False))


def test_cache_location(tmp_path, monkeypatch, model, tok) -> None:
    monkeypatch.setenv("CASS_PLUGINS_CACHE_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "env"
    _encode(model, tok, "cat")
    assert len(_files(tmp_path / "env")) == 1
    monkeypatch.delenv("CASS_PLUGINS_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "cass_plugins"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if os.name != "nt":
        assert cache_dir() == tmp_path / "home" / ".cache" / "cass_plugins"
    # An explicit folder wins over everything.
    _encode(model, tok, "cat", cache_dir=tmp_path / "explicit")
    assert len(_files(tmp_path / "explicit")) == 1


def test_disabled_cache_writes_nothing(model, tok, cdir, monkeypatch) -> None:
    counter = _Counter(model, monkeypatch)
    for _ in range(2):
        encode_text(model, tok, "cat", TEMPLATES, cache=False)
    assert counter.calls == 2 and not cdir.exists()
    encode_text(model, tok, "cat", TEMPLATES, cache=None)
    assert not cdir.exists()
    monkeypatch.setenv("CASS_PLUGINS_NO_CACHE", "1")
    _encode(model, tok, "cat")
    assert not cdir.exists()


def test_batched_equals_independent_per_prompt_loop(model, tok) -> None:
    queries = ["cat", "dog", "traffic light", "sky"]
    templates = TEMPLATES + ("a {}.", "the {} here, seen from afar.")
    with torch.no_grad():
        ref = []
        for q in queries:
            acc = torch.zeros(model.text_projection.shape[1])
            for t in templates:
                e = model.encode_text(tok([t.format(q)]))[0].float()
                acc += e / e.norm()
            ref.append(acc / acc.norm())
        ref = torch.stack(ref)
    for bs in (1, 5, 64, 256):
        out = encode_text(model, tok, queries, templates, batch_size=bs, cache=False)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_progress_bar(model, tok, capsys, monkeypatch) -> None:
    encode_text(model, tok, "cat; dog", TEMPLATES, cache=False)  # default: stderr is not a terminal here
    assert capsys.readouterr().err == ""
    encode_text(model, tok, "cat; dog", TEMPLATES, cache=False, progress=True)
    err = capsys.readouterr().err
    assert "text embeddings" in err and f"{2 * len(TEMPLATES)}/{2 * len(TEMPLATES)}" in err
    encode_text(model, tok, "cat; dog", TEMPLATES, cache=False, progress=False)
    assert capsys.readouterr().err == ""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert _progress_bar(10, None) is None
    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = _progress_bar(10, None)
    assert bar is not None and bar.delay == 1.0  # auto mode: only runs over a second show it
    bar.close()
    assert _progress_bar(10, False) is None


def test_overlong_prompt_is_an_error(model, tok, cdir) -> None:
    # Two names that agree on their first 80 words: truncated to 77 tokens they would get one embedding.
    stem = " ".join(["very"] * 80)
    with pytest.raises(ValueError, match=r"class '.* long cat' with template 'a photo of a \{\}\.'.*tokens"):
        encode_text(model, tok, [f"{stem} long cat", f"{stem} long dog"], TEMPLATES, cache=False)
    with pytest.raises(ValueError, match="context of 77 tokens"):
        _encode(model, tok, ["cat", f"{stem} dog"])
    assert not _files(cdir)  # nothing stored for a failed vocabulary
    # 77 tokens exactly fit (start + 75 + end): no error, and the row is encoded.
    words = tok.encode("a photo of a .")
    fits = " ".join(["cat"] * (77 - 2 - len(words)))
    assert len(tok.encode(f"a photo of a {fits}.")) + 2 == 77
    encode_text(model, tok, [fits], ("a photo of a {}.",), cache=False)
    with pytest.raises(ValueError, match="context of 77"):
        encode_text(model, tok, [fits + " cat"], ("a photo of a {}.",), cache=False)


def test_tokenizer_identity() -> None:
    import open_clip

    a, b = open_clip.SimpleTokenizer(), open_clip.SimpleTokenizer()
    assert tokenizer_hash(a) == tokenizer_hash(b)
    assert tokenizer_hash(open_clip.SimpleTokenizer(context_length=32)) != tokenizer_hash(a)
    assert tokenizer_hash(open_clip.tokenize) != tokenizer_hash(a)


def test_fp16_model_keeps_its_hash(tok, cdir, monkeypatch) -> None:
    model = make_tiny_clip(seed=6).half()
    h = text_tower_hash(model)
    ptrs = [p.data_ptr() for p in model.parameters()]
    fresh = _encode(model, tok, "cat")  # runs in float32, then puts the fp16 storages back
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert cache_module._TOWER_HASHES[model][1] == h == text_tower_hash(model)
    half = _encode(model, tok, "cat", precision="model")  # precision is part of the key
    assert not torch.equal(half, fresh) and len(_files(cdir)) == 2


def test_generic_object_is_not_cached_on_disk(tok, cdir) -> None:
    class Plain:  # no nn.Module: nothing to hash
        def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
            return F.one_hot(tokens[:, 1] % 7, 7).float() + 0.1

    out = encode_text(Plain(), tok, "cat; dog", TEMPLATES, cache=TextEmbeddingCache())
    assert out.shape == (2, 7) and not cdir.exists()


def test_disk_cache_store_merges(tmp_path) -> None:
    disk = DiskTextCache(tmp_path)
    key = {"model": "m", "tokenizer": "t", "templates": ["{}"], "precision": "float32", "device": "cpu"}
    disk.store(key, {"a": torch.ones(3)})
    disk.store(key, {"b": torch.zeros(3)})
    rows = disk.load(key)
    assert sorted(rows) == ["a", "b"] and torch.equal(rows["a"], torch.ones(3))
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed into place


def test_segmenter_text_cache_flag(cdir) -> None:
    from cass_plugins.pipeline.segmenter import Segmenter

    clip = make_tiny_clip(seed=7)
    with Segmenter(clip, None, vocabulary="cat; dog", spectral=False, text_cache=False) as seg:
        seg.text_embeddings(seg.vocabulary)
    assert not cdir.exists()
    with Segmenter(clip, None, vocabulary="cat; dog", spectral=False) as seg:
        seg.text_embeddings(seg.vocabulary)
    assert len(_files(cdir)) == 1


def test_cli_no_cache_flag() -> None:
    from cass_plugins.cli.segment import build_parser

    assert build_parser().parse_args(["img.png", "--no-cache"]).no_cache is True
    assert build_parser().parse_args(["img.png"]).no_cache is False


def test_tokenizer_identity_of_functions() -> None:
    import functools

    import open_clip

    name = cache_module._callable_name
    assert name(open_clip.tokenize) == "open_clip.tokenizer.tokenize"
    short = functools.partial(open_clip.tokenize, context_length=32)
    assert "0x" not in name(short) and "context_length" in name(short)  # no address: same key in every process
    assert tokenizer_hash(short) != tokenizer_hash(open_clip.tokenize)
