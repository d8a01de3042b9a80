"""Templates and text embeddings against a float64 re-computation of cass.md §4 / protocol.md §3."""
from __future__ import annotations

import copy

import pytest
import torch

from cass_plugins.pipeline.templates import IMAGENET_TEMPLATES
from cass_plugins.pipeline.text import TextEmbeddingCache, default_tokenizer, encode_text
from cass_plugins.pipeline.vocabulary import Vocabulary
from conftest import TINY_CLIP, make_tiny_clip


def test_templates() -> None:
    assert isinstance(IMAGENET_TEMPLATES, tuple) and len(IMAGENET_TEMPLATES) == 80
    assert len(set(IMAGENET_TEMPLATES)) == 80
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert IMAGENET_TEMPLATES[39] == "a photo of a {}."
    assert all(t.count("{}") == 1 and t.count("{") == 1 for t in IMAGENET_TEMPLATES)
    assert IMAGENET_TEMPLATES[35].format("cat") == "a cat in a video game."


def _reference(model64: torch.nn.Module, tokenizer, queries, templates) -> torch.Tensor:
    """Float64 loop over templates: one encode_text call per template (all queries), normalise, accumulate."""
    acc = torch.zeros(len(queries), model64.text_projection.shape[1], dtype=torch.float64)
    for t in templates:
        e = model64.encode_text(tokenizer([t.format(q) for q in queries])).double()
        for i in range(len(queries)):
            acc[i] += e[i] / e[i].norm()
    mean = acc / len(templates)
    return mean / mean.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    return make_tiny_clip(), default_tokenizer(TINY_CLIP)


def test_encode_text_matches_float64_reference(tiny) -> None:
    model, tok = tiny
    vocab = Vocabulary.parse("cat; dog, puppy; wood ")
    out = encode_text(model, tok, vocab, cache=None)
    assert out.shape == (4, 32) and out.dtype == torch.float32
    with torch.no_grad():
        ref = _reference(copy.deepcopy(model).double(), tok, vocab.queries, IMAGENET_TEMPLATES)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)
    # Batching is invisible, and other template sets follow the same rule.
    torch.testing.assert_close(encode_text(model, tok, vocab, batch_size=7, cache=None), out, atol=1e-6, rtol=0)
    two = ("a photo of a {}.", "itap of my {}.")
    with torch.no_grad():
        ref2 = _reference(copy.deepcopy(model).double(), tok, vocab.queries, two)
    torch.testing.assert_close(encode_text(model, tok, vocab, two, cache=None).double(), ref2, atol=2e-6, rtol=0)


class _CountingModel(torch.nn.Module):
    """Any object with encode_text: a bag of random token embeddings (not open_clip)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.table = torch.nn.Parameter(torch.randn(49408, 6))
        self.calls = 0

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.table[tokens].sum(1)


def test_generic_model_hand_reference() -> None:
    model, tok = _CountingModel(), default_tokenizer(None)
    templates = ("a {}.", "the {} here.")
    out = encode_text(model, tok, ["cat", "dog"], templates, cache=None)
    table = model.table.detach().double()
    for i, q in enumerate(["cat", "dog"]):
        es = [table[tok([t.format(q)])[0]].sum(0) for t in templates]
        mean = sum(e / e.norm() for e in es) / 2
        torch.testing.assert_close(out[i].double(), mean / mean.norm(), atol=1e-6, rtol=0)


def test_cache_encodes_once() -> None:
    model, tok = _CountingModel(), default_tokenizer(None)
    cache = TextEmbeddingCache()
    first = encode_text(model, tok, "cat; dog", cache=cache, batch_size=64)
    calls = model.calls
    assert calls == 3  # 160 prompts in batches of 64
    again = encode_text(model, tok, Vocabulary.parse(["cat", "dog"]), cache=cache, batch_size=64)
    assert model.calls == calls and torch.equal(first, again) and len(cache) == 1
    again.zero_()  # results are copies: the cache is not corrupted
    assert torch.equal(encode_text(model, tok, "cat; dog", cache=cache), first)
    encode_text(model, tok, "cat; dog", ("a {}.",), cache=cache)  # other templates: a new entry
    assert model.calls == calls + 1 and len(cache) == 2
    encode_text(model, tok, "cat; dog", cache=None)  # no cache: always computes
    assert model.calls > calls + 1
    other = _CountingModel()  # another object with the same weights: the on-disk cache is keyed by content
    assert torch.equal(encode_text(other, tok, "cat; dog", cache=cache), first) and other.calls == 0
    with torch.no_grad():
        other.table[0, 0] += 1  # in place: the in-memory entry of `other` must not be served either
    encode_text(other, tok, "cat; dog", cache=cache)
    assert other.calls > 0
    cache.clear()
    assert len(cache) == 0


def test_default_cache_is_used() -> None:
    model = _CountingModel()
    tok = default_tokenizer(None)
    encode_text(model, tok, "zebra")
    n = model.calls
    encode_text(model, tok, "zebra")
    assert model.calls == n


def test_fp16_model_runs_in_float32_and_is_restored() -> None:
    model = make_tiny_clip().half()
    tok = default_tokenizer(TINY_CLIP)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    out = encode_text(model, tok, "cat; dog", ("a photo of a {}.", "a {}."), cache=None)
    assert out.dtype == torch.float32
    after = model.state_dict()
    assert all(after[k].dtype == dtypes[k] and torch.equal(after[k], before[k]) for k in before)
    # Same as the float32 model holding the fp16-rounded weights.
    ref = encode_text(copy.deepcopy(model).float(), tok, "cat; dog", ("a photo of a {}.", "a {}."), cache=None)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # precision="model" runs the fp16 tower: close, but not the float32 result.
    half = encode_text(model, tok, "cat; dog", ("a photo of a {}.", "a {}."), precision="model", cache=None)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, out, atol=5e-3, rtol=0)


def test_encode_text_errors(tiny) -> None:
    model, tok = tiny
    with pytest.raises(ValueError, match="placeholder"):
        encode_text(model, tok, "cat", ("a photo",), cache=None)
    with pytest.raises(ValueError, match="precision"):
        encode_text(model, tok, "cat", precision="fp16", cache=None)
    with pytest.raises(ValueError, match="empty vocabulary"):
        encode_text(model, tok, [], cache=None)


def test_default_tokenizer() -> None:
    import open_clip

    tok = default_tokenizer(None)
    ref = open_clip.tokenize(["a photo of a cat."])
    assert torch.equal(tok(["a photo of a cat."]), ref)
    assert torch.equal(default_tokenizer("ViT-B/16")(["a photo of a cat."]), ref)
    assert default_tokenizer(None) is tok  # cached
