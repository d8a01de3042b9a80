"""End-to-end ``Segmenter`` on tiny random models and real photos (scikit-image), against float64 re-computations.

The references below restate cass.md §3-§5 and protocol.md §7-8 in float64 (Ward clustering with scipy, OTA, OPS,
window accumulation, resizing, softmax, synonyms max, background threshold); they only take the per-window dense
features from ``encode_dense`` and the geometry from the independently tested ``window_grid``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from skimage import data

from cass_plugins.pipeline.image import CLIP_MEAN_255, CLIP_STD_255
from cass_plugins.backbone.loading import WeightsUnavailableError, load_clip, load_vfm
from cass_plugins.core.patch import encode_dense, get_patch, patch_clip
from cass_plugins.pipeline.segmenter import Segmenter
from cass_plugins.pipeline.vocabulary import Vocabulary
from cass_plugins.pipeline.windows import window_grid
from conftest import make_tiny_clip, make_tiny_vfm

VOCAB = "cat, kitten; dog, puppy; sky; grass, lawn"  # 4 classes, 7 queries
SMALL = dict(short_side=96, crop=64, stride=32)  # chelsea 300×451 → 96×144 → 2×4 windows of 64²
# Random weights make tied head matchings common (cass.md §10): a batch of 1 and a batch of 8 compute the costs with
# different float rounding and may pick different tied optima. Comparisons across batchings break ties the same way.
STABLE = dict(tie_break="sequential")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def models():
    return make_tiny_clip(), make_tiny_vfm()


@pytest.fixture(scope="module")
def chelsea():
    return data.chelsea()  # (300, 451, 3) uint8


# ------------------------------------------------------------------------------------------------ references
def ref_clusters(text: np.ndarray, h: float) -> np.ndarray:
    """Ward clusters of the queries on cosine distances (cass.md §4.1), float64."""
    t = text / np.linalg.norm(text, axis=1, keepdims=True)
    dist = np.clip(1.0 - t @ t.T, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    return fcluster(linkage(squareform(dist, checks=False), method="ward"), t=h, criterion="distance")


def ref_window_logits(feat, text, prior, clusters, alpha, gamma, top_n=2, ota=True):
    """(Q, gh, gw) float64: OTA (cass.md §4.2-3) then OPS (§3) for one window, written with loops."""
    gh, gw, d = feat.shape
    f = feat.reshape(-1, d)
    f = f / f.norm(dim=1, keepdim=True)
    adjusted = text.clone()
    if ota:
        for c in np.unique(clusters):
            members = np.flatnonzero(clusters == c)
            best = int(members[np.argmax(prior.numpy()[members])])  # np.argmax: the first maximum
            t = text[best]
            sims = f @ (t / t.norm())
            top = torch.argsort(sims, descending=True)[:top_n]
            mu = f[top].mean(0)
            mu = mu / mu.norm()
            new = (1 - alpha) * t + alpha * mu
            adjusted[best] = new / new.norm()
    adjusted = adjusted / adjusted.norm(dim=1, keepdim=True)
    s = (f @ adjusted.T).T.reshape(-1, gh, gw)
    return (1 - gamma) * s + gamma * prior[:, None, None]


def bilinear64(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x[None].double(), size=tuple(size), mode="bilinear", align_corners=False)[0]


def ref_class_probs(logits: torch.Tensor, vocab: Vocabulary, scale: float = 40.0) -> torch.Tensor:
    """max over each class's synonyms of softmax over queries of scale·logits, float64 (protocol.md §8)."""
    p = torch.softmax(logits.double() * scale, dim=0)
    q2c = np.array(vocab.query_to_class)
    return torch.stack([p[torch.as_tensor(np.flatnonzero(q2c == k))].max(0).values for k in range(vocab.num_classes)])


def normalised_input(image, short_side) -> torch.Tensor:
    """The resized, CLIP-normalised input via the independently tested image functions."""
    from cass_plugins.pipeline.image import clip_normalize, load_image, resize_short_side

    return clip_normalize(resize_short_side(load_image(image), short_side))[None]


def text64(clip, vocab) -> torch.Tensor:
    from cass_plugins.pipeline.text import default_tokenizer, encode_text

    return encode_text(clip, default_tokenizer(None), vocab).double()


def pick_threshold(text: torch.Tensor) -> float:
    """A Ward cut height that leaves at least one multi-query cluster and at least two clusters."""
    t = text.numpy()
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    dist = np.clip(1.0 - t @ t.T, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    heights = np.sort(linkage(squareform(dist, checks=False), method="ward")[:, 2])
    assert heights[2] - heights[1] > 1e-6 * max(heights[2], 1e-12), "degenerate linkage heights"
    return float((heights[1] + heights[2]) / 2)


# ------------------------------------------------------------------------------------------------ outputs
def test_result_shapes_ranges_and_areas(models, chelsea):
    clip, vfm = models
    vocab = Vocabulary.parse(VOCAB)
    with Segmenter(clip, vfm, vocabulary=VOCAB, **SMALL) as seg:
        res = seg.segment(chelsea)
    assert res.labels.shape == (300, 451) and res.labels.dtype == torch.int64
    assert res.probs.shape == (4, 300, 451)
    assert res.logits.shape == (7, 300, 451)
    assert 0 <= int(res.labels.min()) and int(res.labels.max()) < vocab.num_classes
    assert float(res.probs.min()) >= 0.0 and float(res.probs.max()) <= 1.0
    # cosines blended with a cosine prior stay cosines
    assert torch.isfinite(res.logits).all() and float(res.logits.abs().max()) <= 1.0 + 1e-5
    areas = res.class_areas()
    assert list(areas) == list(vocab.class_names)
    assert sum(areas.values()) == pytest.approx(1.0)
    counts = np.bincount(res.labels.numpy().ravel(), minlength=4) / res.labels.numel()
    assert np.allclose([areas[n] for n in vocab.class_names], counts)
    assert res.vocabulary == vocab


def test_probs_are_max_over_synonyms_and_labels_their_argmax(models, chelsea):
    clip, vfm = models
    vocab = Vocabulary.parse(VOCAB)
    with Segmenter(clip, vfm, vocabulary=vocab, **SMALL) as seg:
        res = seg.segment(chelsea)
    ref = ref_class_probs(res.logits, vocab)
    assert torch.allclose(res.probs.double(), ref, atol=1e-5)
    top2 = ref.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-5  # skip near-ties between float32 and float64
    assert clear.float().mean() > 0.9
    assert torch.equal(res.labels[clear], ref.argmax(0)[clear])


def test_background_threshold(models, chelsea):
    clip, vfm = models
    vocab = Vocabulary.parse(VOCAB)
    with Segmenter(clip, vfm, vocabulary=vocab, **SMALL) as seg:
        logits = seg.segment(chelsea).logits
    maxprob = ref_class_probs(logits, vocab).max(0)
    thd = float(maxprob.values.median())
    with Segmenter(clip, vfm, vocabulary=vocab, prob_thd=thd, **SMALL) as seg:
        res = seg.segment(chelsea)
    assert torch.allclose(res.logits, logits)  # the threshold only acts on the decision
    expected = torch.where(maxprob.values < thd, torch.zeros_like(maxprob.indices), maxprob.indices)
    clear = (maxprob.values - thd).abs() > 1e-6
    assert torch.equal(res.labels[clear], expected[clear])
    below = clear & (maxprob.values < thd)
    assert below.any() and (clear & ~below & (maxprob.indices != 0)).any()
    assert (res.labels[below] == 0).all()


# ------------------------------------------------------------------------------------------------ float64 pipeline
@pytest.mark.parametrize(
    "geometry, prior_source",
    [
        (SMALL, "image"),  # 2×4 windows of 64²
        (SMALL, "crop"),  # Cityscapes style: each crop's own embedding
        (dict(short_side=48, crop=64, stride=32), "image"),  # image shorter than a window: 48×64 windows
    ],
)
def test_slide_logits_equal_float64_reference(models, chelsea, geometry, prior_source):
    clip, vfm = models
    vocab = Vocabulary.parse(VOCAB)
    text = text64(clip, vocab)
    h_thd = pick_threshold(text)
    alpha, gamma = 0.5, 0.3  # large, so that a wrong adjustment or prior shows
    x = normalised_input(chelsea, geometry["short_side"])
    whole = encode_dense(clip, x).image_embeds.double()[0]  # unpatched: the unmodified model's embedding
    clusters = ref_clusters(text.numpy(), h_thd)
    assert len(np.unique(clusters)) >= 2 and np.bincount(clusters).max() >= 2

    with Segmenter(clip, vfm, vocabulary=vocab, alpha=alpha, gamma=gamma, h_threshold=h_thd,
                   prior_source=prior_source, **STABLE, **geometry) as seg:
        res = seg.segment(chelsea)
        H, W = x.shape[-2:]
        canvas = torch.zeros(vocab.num_queries, H, W, dtype=torch.float64)
        count = torch.zeros(1, H, W, dtype=torch.float64)
        windows = window_grid(H, W, geometry["crop"], geometry["stride"])
        for y1, y2, x1, x2 in windows:
            dense = encode_dense(clip, x[:, :, y1:y2, x1:x2])  # one window at a time, patched model
            emb = whole if prior_source == "image" else dense.image_embeds.double()[0]
            prior = (text / text.norm(dim=1, keepdim=True)) @ (emb / emb.norm())
            win = ref_window_logits(dense.features.double()[0], text, prior, clusters, alpha, gamma)
            canvas[:, y1:y2, x1:x2] += bilinear64(win, (y2 - y1, x2 - x1))
            count[:, y1:y2, x1:x2] += 1
    assert (count > 0).all()
    ref = bilinear64(canvas / count, (300, 451))
    assert torch.allclose(res.logits.double(), ref, atol=1e-5), float((res.logits.double() - ref).abs().max())


def test_whole_mode_equals_float64_reference_and_single_window_slide(models, chelsea):
    clip, vfm = models
    vocab = Vocabulary.parse(VOCAB)
    text = text64(clip, vocab)
    h_thd = pick_threshold(text)
    kw = dict(alpha=0.5, gamma=0.3, h_threshold=h_thd, short_side=96, **STABLE)
    x = normalised_input(chelsea, 96)
    whole = encode_dense(clip, x).image_embeds.double()[0]
    with Segmenter(clip, vfm, vocabulary=vocab, mode="whole", **kw) as seg:
        res_whole = seg.segment(chelsea)
        dense = encode_dense(clip, x)
    prior = (text / text.norm(dim=1, keepdim=True)) @ (whole / whole.norm())
    win = ref_window_logits(dense.features.double()[0], text, prior, ref_clusters(text.numpy(), h_thd), 0.5, 0.3)
    ref = bilinear64(bilinear64(win, x.shape[-2:]), (300, 451))  # grid → input size → original (two steps)
    assert torch.allclose(res_whole.logits.double(), ref, atol=1e-5)
    # One window covering the whole input (crop larger than the image) is the whole-image pass.
    with Segmenter(clip, vfm, vocabulary=vocab, mode="slide", crop=256, stride=128, **kw) as seg:
        res_slide = seg.segment(chelsea)
    assert torch.allclose(res_slide.logits, res_whole.logits, atol=1e-5)
    assert torch.equal(res_slide.labels, res_whole.labels)


def test_prior_once_per_image_vfm_once_per_window_and_batching(models, chelsea, monkeypatch):
    import cass_plugins.core.patch as segmenter_module  # where the handle computes the prior

    clip, vfm = models
    calls = {"image_embedding": 0}
    real = segmenter_module.image_embedding

    def counting(model, images):
        calls["image_embedding"] += 1
        return real(model, images)

    monkeypatch.setattr(segmenter_module, "image_embedding", counting)
    seen = {"clip": [], "vfm": []}
    hooks = [
        clip.visual.conv1.register_forward_pre_hook(lambda m, a: seen["clip"].append(a[0].shape[0])),
        vfm.patch_embed.proj.register_forward_pre_hook(lambda m, a: seen["vfm"].append(a[0].shape[0])),
    ]
    n_windows = len(window_grid(96, 144, 64, 32))
    assert n_windows == 8
    results = {}
    try:
        for batch in (1, 3, 8):
            calls["image_embedding"] = 0
            seen["clip"].clear()
            seen["vfm"].clear()
            with Segmenter(clip, vfm, vocabulary=VOCAB, window_batch=batch, **STABLE, **SMALL) as seg:
                results[batch] = seg.segment(chelsea)
            assert calls["image_embedding"] == 1  # the whole-image prior, once per image
            n_batches = -(-n_windows // batch)
            # CLIP: one whole-image pass + one pass per batch of windows; the VFM: each window once, batched
            assert seen["clip"] == [1] + [min(batch, n_windows - i * batch) for i in range(n_batches)]
            assert seen["vfm"] == seen["clip"][1:]
    finally:
        for h in hooks:
            h.remove()
    for batch in (1, 3):
        assert torch.allclose(results[batch].logits, results[8].logits, atol=1e-5)
        assert torch.equal(results[batch].labels, results[8].labels)


def test_text_embeddings_computed_once_per_vocabulary(models, chelsea, monkeypatch):
    clip, vfm = models
    calls = []
    real = clip.encode_text

    def counting(tokens, *a, **k):
        calls.append(tokens.shape[0])
        return real(tokens, *a, **k)

    monkeypatch.setattr(clip, "encode_text", counting)
    vocab = "a rare word; another rare word"  # not embedded by any other test
    with Segmenter(clip, vfm, vocabulary=vocab, **SMALL) as seg:
        seg.segment(chelsea)
        first = len(calls)
        seg.segment(chelsea[:200, :250])
    assert first > 0 and len(calls) == first


# ------------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("geometry", [dict(short_side=40, crop=64, stride=32), dict(short_side=96, crop=224, stride=112)])
def test_image_smaller_than_window(models, chelsea, geometry):
    clip, vfm = models
    with Segmenter(clip, vfm, vocabulary=VOCAB, **geometry) as seg:
        res = seg.segment(chelsea)
    assert res.labels.shape == (300, 451) and torch.isfinite(res.logits).all()


def test_non_square_portrait_and_inputs_of_every_kind(models, chelsea):
    clip, vfm = models
    portrait = np.ascontiguousarray(chelsea.transpose(1, 0, 2))  # 451×300
    with Segmenter(clip, vfm, vocabulary=VOCAB, **SMALL) as seg:
        res = seg.segment(portrait)
        assert res.labels.shape == (451, 300) and res.probs.shape == (4, 451, 300)
        # the same pixels as a PIL image and as a channels-first tensor give the same result
        for source in (Image.fromarray(portrait), torch.from_numpy(portrait).permute(2, 0, 1)):
            assert torch.equal(seg.segment(source).logits, res.logits)


def test_preprocess_rounds_the_resized_image_like_the_reference(models, chelsea):
    clip, vfm = models
    with Segmenter(clip, vfm, vocabulary=VOCAB, **SMALL) as seg:
        x, original = seg.preprocess(chelsea)
    assert original == (300, 451) and tuple(x.shape) == (1, 3, 96, 144)
    # the reference resizes uint8 → uint8 (cv2.resize), then normalises: x·std + mean is integral
    mean = torch.tensor(CLIP_MEAN_255).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD_255).view(1, 3, 1, 1)
    img = x.double() * std.double() + mean.double()
    assert (img - img.round()).abs().max() < 1e-3
    assert img.min() >= -1e-3 and img.max() <= 255 + 1e-3


def test_pamr_refines_logits(models, chelsea):
    clip, vfm = models
    with Segmenter(clip, vfm, vocabulary=VOCAB, **SMALL) as seg:
        plain = seg.segment(chelsea)
    with Segmenter(clip, vfm, vocabulary=VOCAB, pamr_steps=2, pamr_dilations=(1, 2), **SMALL) as seg:
        refined = seg.segment(chelsea)
    assert refined.logits.shape == plain.logits.shape and not torch.allclose(refined.logits, plain.logits)
    # PAMR propagates convex combinations of neighbours: the range cannot grow
    assert refined.logits.max() <= plain.logits.max() + 1e-6 and refined.logits.min() >= plain.logits.min() - 1e-6


# ------------------------------------------------------------------------------------------------ image modes
def test_grayscale_rgba_and_16bit_images_are_converted(models, tmp_path):
    clip, vfm = models
    rgb = data.astronaut()[::2, ::3]  # 256×171, non-square
    gray = (rgb @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(gray.shape, 255, np.uint8)]), mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")  # 16-bit PNG
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    with Segmenter(clip, vfm, vocabulary=VOCAB, **SMALL) as seg:
        gray3 = seg.segment(np.repeat(gray[:, :, None], 3, axis=2))
        for name, expected in (("gray.png", gray3), ("gray16.png", gray3), ("rgba.png", seg.segment(rgb))):
            res = seg.segment(tmp_path / name)
            assert res.labels.shape == rgb.shape[:2], name
            assert torch.equal(res.logits, expected.logits), name  # x·257 / 257 and opaque alpha are exact
        res = seg.segment(str(tmp_path / "rgb.png"))
        assert torch.equal(res.logits, seg.segment(rgb).logits)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "poison, match",
    [
        ("clip:visual.proj", "visual.proj"),
        ("clip:visual.conv1.weight", "visual.conv1.weight"),
        ("clip:visual.transformer.resblocks.1.attn.in_proj_weight", "resblocks.1.attn.in_proj_weight"),
        ("vfm:patch_embed.proj.weight", "VFM parameters"),
    ],
)
def test_nan_in_weights_gives_a_clear_error(poison, match, chelsea):
    clip, vfm = make_tiny_clip(), make_tiny_vfm()
    which, name = poison.split(":")
    param = dict((clip if which == "clip" else vfm).named_parameters())[name]
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    with Segmenter(clip, vfm, vocabulary=VOCAB, **SMALL) as seg:
        with pytest.raises(FloatingPointError, match="NaN or inf") as info:
            seg.segment(chelsea)
    assert match in str(info.value)


def test_nan_features_without_spectral_or_prior(chelsea):
    clip = make_tiny_clip()
    with torch.no_grad():
        clip.visual.ln_post.weight[0] = float("nan")
    with Segmenter(clip, None, vocabulary=VOCAB, spectral=False, presence_prior=False, ota=False, **SMALL) as seg:
        with pytest.raises(FloatingPointError, match="CLIP patch features.*ln_post"):
            seg.segment(chelsea)


@pytest.mark.parametrize(
    "vocabulary, match",
    [
        ("", "empty vocabulary"),
        ("  ;  ", "empty vocabulary"),
        ([], "empty vocabulary"),
        ("cat; Cat", "duplicate class name"),
        ("cat, kitten; dog, kitten", "duplicate class name 'kitten'"),
        ("cat;;dog", "empty class name"),
    ],
)
def test_bad_vocabulary(models, chelsea, vocabulary, match):
    clip, vfm = models
    with pytest.raises(ValueError, match=match):
        Segmenter(clip, vfm, vocabulary=vocabulary, **SMALL)
    assert get_patch(clip) is None  # a refused vocabulary leaves the model unpatched
    with Segmenter(clip, vfm, **SMALL) as seg:
        with pytest.raises(ValueError, match=match):
            seg.segment(chelsea, vocabulary)
        with pytest.raises(ValueError, match="no vocabulary"):
            seg.segment(chelsea)


def test_missing_unreadable_and_directory_images(models, chelsea, tmp_path):
    clip, vfm = models
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    truncated = tmp_path / "truncated.png"
    Image.fromarray(chelsea).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with Segmenter(clip, vfm, vocabulary=VOCAB, **SMALL) as seg:
        with pytest.raises(FileNotFoundError, match="missing.png"):
            seg.segment(tmp_path / "missing.png")
        with pytest.raises(ValueError, match="broken.jpg is not an image"):
            seg.segment(bad)
        with pytest.raises(ValueError, match="truncated.png is not an image"):
            seg.segment(truncated)
        with pytest.raises(ValueError, match="directory"):
            seg.segment(tmp_path)
        assert seg.segment(chelsea).labels.shape == (300, 451)  # still usable afterwards


def test_closed_segmenter_refuses(models, chelsea):
    clip, vfm = models
    seg = Segmenter(clip, vfm, vocabulary=VOCAB, **SMALL)
    seg.close()
    assert get_patch(clip) is None
    with pytest.raises(RuntimeError, match="closed"):
        seg.segment(chelsea)
    patch_clip(clip, vfm).remove()  # the model can be patched again


# ------------------------------------------------------------------------------------------------ model loading
@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty weights cache, whatever the machine (the code path of an offline machine)."""
    import huggingface_hub.constants as hub

    import cass_plugins.backbone.loading as loading

    monkeypatch.setattr(loading, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_missing_weights_offline(offline):
    with pytest.raises(WeightsUnavailableError, match=r"ViT-B-16/openai.*--pretrained /path/to/checkpoint"):
        load_clip("ViT-B-16", "openai")
    with pytest.raises(WeightsUnavailableError, match="--vfm-weights"):
        load_vfm("vit_small_patch16_224.dino")


def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_clip("ViT-B-16", str(tmp_path / "nothing.pt"))
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_vfm("vit_base_patch8_224", str(tmp_path / "nothing.pth"))
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Q-99'"):
        load_clip("ViT-Q-99", "openai")
    with pytest.raises(ValueError, match="no pretrained tag 'no-such-tag'"):
        load_clip("ViT-B-16", "no-such-tag")
    with pytest.raises(ValueError, match="unknown timm model"):
        load_vfm("not_a_vit_at_all", "random")
    with pytest.raises(ValueError, match="precision"):
        load_vfm("vit_small_patch16_224", "random", precision="fp8")


# ------------------------------------------------------------------------------------------------ maps=False
def ref_labels64(small: torch.Tensor, size, vocab: Vocabulary, prob_thd: float, area_thd: float | None):
    """Labels and decisive class probabilities from low-resolution logits, all in float64: one full bilinear
    upsample, softmax, synonym max, SCLIP's area rule on foreground pixels, background threshold."""
    probs = ref_class_probs(bilinear64(small, size), vocab)
    if area_thd is not None:
        counts = torch.bincount(probs.argmax(0).flatten(), minlength=vocab.num_classes)
        for c in range(1, vocab.num_classes):
            if counts[c] <= area_thd * counts[1:].sum():
                probs[c] = 0
    best = probs.max(0)
    return torch.where(best.values < prob_thd, torch.zeros_like(best.indices), best.indices), probs


@pytest.mark.parametrize("mode", ["slide", "whole"])
@pytest.mark.parametrize("size", [(300, 451), (517, 389), (61, 90)])
@pytest.mark.parametrize("thresholds", [dict(), dict(prob_thd=0.3), dict(area_thd=0.2)])
def test_labels_without_maps_equal_labels_with_maps_and_float64_reference(models, chelsea, mode, size, thresholds):
    clip, vfm = models
    vocab = Vocabulary.parse(VOCAB)
    image = np.asarray(Image.fromarray(chelsea).resize(size[::-1], Image.BILINEAR))
    with Segmenter(clip, vfm, vocabulary=vocab, mode=mode, **SMALL, **STABLE, **thresholds) as seg:
        full = seg.segment(image)
        lean = seg.segment(image, maps=False)
        x, _ = seg.preprocess(image)
    assert lean.probs is None and full.probs is not None
    assert lean.labels.shape == full.labels.shape == size
    assert lean.logits.shape == (len(vocab.queries), *x.shape[-2:])  # the resized input's size
    assert torch.equal(lean.labels, full.labels)
    assert lean.class_areas() == full.class_areas()
    # whole mode's two steps: the maps are one bilinear step from the low-resolution logits
    assert torch.allclose(full.logits.double(), bilinear64(lean.logits, size), atol=1e-5)
    labels, probs = ref_labels64(lean.logits, size, vocab, thresholds.get("prob_thd", 0.0), thresholds.get("area_thd"))
    top2 = probs.topk(2, dim=0).values
    clear = ((top2[0] - top2[1]) > 1e-5) & ((top2[0] - thresholds.get("prob_thd", 0.0)).abs() > 1e-5)
    assert clear.float().mean() > 0.9
    assert torch.equal(lean.labels[clear], labels[clear])
    assert len(labels.unique()) >= 2
    if "prob_thd" in thresholds:
        assert ((labels == 0) & (probs.argmax(0) != 0)).any()  # the threshold acted
    if "area_thd" in thresholds:
        assert (probs == 0).all(dim=(1, 2)).any()  # the area rule dropped a class


def test_labels_without_maps_with_pamr(models, chelsea):
    clip, vfm = models
    with Segmenter(clip, vfm, vocabulary=VOCAB, pamr_steps=2, pamr_dilations=(1, 2), **SMALL) as seg:
        full = seg.segment(chelsea)
        lean = seg.segment(chelsea, maps=False)
        x, _ = seg.preprocess(chelsea)
    assert lean.probs is None and lean.logits.shape[-2:] == x.shape[-2:]
    assert torch.equal(lean.labels, full.labels)
