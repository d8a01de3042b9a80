"""Video (issue 14): streamed decoding, the stable head assignment on constructed costs, motion-guarded smoothing
against a float64 re-computation, segment_video on synthetic jittered videos, restoring the Segmenter, errors."""
from __future__ import annotations

import contextlib
import itertools
import math
import sys

import numpy as np
import pytest
import torch
from skimage import data

from cass_plugins.cass.matching import match_heads
from cass_plugins.pipeline.postprocess import labels_at_size
from cass_plugins.pipeline.segmenter import Segmenter
from cass_plugins.video import io as vio
from cass_plugins.video.segment import segment_video
from cass_plugins.video.temporal import LogitSmoother, StableMatching, TemporalConfig, resolve_temporal
from conftest import make_tiny_clip, make_tiny_vfm

av = pytest.importorskip("av")

CLASSES = "person; sky; rocket; wall"
TINY = dict(short_side=64, crop=64, stride=32)  # text cache: a fresh folder per test (conftest)


def jittered_frames(n: int = 6, seed: int = 0, size: int = 4) -> list[np.ndarray]:
    """A static scene (skimage's astronaut) seen by a camera shaking by up to 2 px."""
    img = data.astronaut()[::size, ::size]
    rng = np.random.default_rng(seed)
    return [np.roll(img, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1)) for _ in range(n)]


def write_video(path, frames: list[np.ndarray], fps: int = 10, codec: str = "libx264") -> None:
    """Written with PyAV directly, not through the module under test."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qp": "0"} if codec == "libx264" else {}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


# ------------------------------------------------------------------------------------------------ stable matching
def brute_force_fused(cost: np.ndarray) -> list[int]:
    """Official reading of the unique optimal pairing: CLIP head i receives VFM head col_ind[i] (docs/matching.md),
    the inverse of the pairing p (p[j] = VFM row of CLIP column j)."""
    h = cost.shape[0]
    totals = {p: math.fsum(cost[p[j], j] for j in range(h)) for p in itertools.permutations(range(h))}
    best = min(totals, key=totals.get)
    assert sorted(totals.values())[1] > totals[best]  # the constructed optimum is unique
    fused = [0] * h
    for j, i in enumerate(best):
        fused[i] = j
    return fused


def tied_cost(favoured: list[int], eps: float) -> torch.Tensor:
    """An additive cost (every pairing ties) with the pairing ``favoured`` made better by ``3·eps``."""
    a, b = np.array([0.1, 0.3, 0.2]), np.array([0.05, 0.4, 0.25])
    c = a[:, None] + b[None, :]
    for j, i in enumerate(favoured):
        c[i, j] -= eps
    return torch.tensor(c, dtype=torch.float32)


A, B = [1, 2, 0], [2, 0, 1]  # two 3-cycles (each other's inverse): official and paper readings differ


def test_stable_matching_keeps_a_tie_and_takes_a_clear_optimum():
    frames = [tied_cost(A, 1e-6), tied_cost(B, 1e-6), tied_cost(B, 0.1)]
    expected_plain = [brute_force_fused(c.double().numpy()) for c in frames]
    assert expected_plain[0] != expected_plain[1] == expected_plain[2]
    # without the component the near-tie flips between frames 1 and 2
    plain = [match_heads(c, "complementary").assignment.tolist() for c in frames]
    assert plain == expected_plain
    stable = StableMatching(tie_margin=1e-4)
    got = [stable(c, 0) for c in frames]
    # frame 2: B is better by 3e-6 < 1e-4, A is kept; frame 3: B is better by 0.3, it is taken
    assert got == [expected_plain[0], expected_plain[0], expected_plain[2]]
    assert (stable.reused, stable.calls) == (1, 3)
    # the kept assignment reproduces through match_heads as an explicit assignment (what spectral does with it)
    assert match_heads(frames[1], got[1]).assignment.tolist() == got[1]


def test_stable_matching_margin_zero_and_other_windows():
    stable = StableMatching(tie_margin=0.0)
    first = stable(tied_cost(A, 1e-6), 0)
    assert stable(tied_cost(B, 1e-6), 0) != first  # margin 0: only exact ties are kept
    # each window has its own predecessor: window 3 has none yet, window 0 keeps A
    stable = StableMatching(tie_margin=1e-4)
    kept = stable(tied_cost(A, 1e-6), 0)
    assert stable(tied_cost(B, 1e-6), 3) == brute_force_fused(tied_cost(B, 1e-6).double().numpy())
    assert stable(tied_cost(B, 1e-6), 0) == kept
    stable.reset()
    assert stable(tied_cost(B, 1e-6), 0) != kept


def test_stable_matching_similar_and_paper_pairing():
    # 'similar' maximises: the favoured pairing of −C; paper pairing fuses the pairs themselves
    stable = StableMatching("similar", tie_margin=1e-4, pairing="paper")
    assert stable(-tied_cost(A, 1e-6), 0) == A
    assert stable(-tied_cost(B, 1e-6), 0) == A
    assert stable(-tied_cost(B, 0.1), 0) == B
    with pytest.raises(ValueError, match="sequential"):
        StableMatching("sequential")


# ------------------------------------------------------------------------------------------------ smoothing
def test_smoother_matches_float64_reference():
    rng = np.random.default_rng(1)
    beta, thr, cut = 0.6, 0.1, 0.3
    f0 = rng.integers(0, 256, size=(3, 8, 12), dtype=np.uint8)
    f1 = f0.copy()
    f1[:, 0:2, 0:4] = 255 - f1[:, 0:2, 0:4]  # the top-left two cells change a lot
    f1 = np.clip(f1.astype(int) + rng.integers(-3, 4, size=f1.shape), 0, 255).astype(np.uint8)  # noise elsewhere
    f2 = np.clip(f1.astype(int) + rng.integers(-3, 4, size=f1.shape), 0, 255).astype(np.uint8)
    f3 = 255 - f2  # a scene cut
    frames = [f0, f1, f2, f3]
    logits = [rng.standard_normal((2, 4, 6)) for _ in frames]

    smoother = LogitSmoother(beta, thr, cut)
    state = None
    for k, (f, l) in enumerate(zip(frames, logits)):
        got, reset = smoother.update(torch.tensor(l, dtype=torch.float32), torch.from_numpy(f))
        if k == 0:
            ref, ref_reset = l, 1.0
        else:
            diff = np.abs(f.astype(np.float64) - frames[k - 1]).mean(0) / 255.0
            if diff.mean() > cut:
                ref, ref_reset = l, 1.0
            else:
                cell = diff.reshape(4, 2, 6, 2).mean(axis=(1, 3))  # 2×2 pixels per logit cell
                moved = cell > thr
                ref = np.where(moved[None], l, (1 - beta) * l + beta * state)
                ref_reset = moved.mean()
        state = ref
        np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-6)
        assert reset == pytest.approx(ref_reset)
    assert smoother.update(torch.zeros(2, 4, 6), torch.from_numpy(f3))[1] == 0.0  # static: nothing reset
    with pytest.raises(ValueError, match="smoothing"):
        LogitSmoother(1.0, thr, cut)


def test_temporal_modes():
    assert resolve_temporal("off") == TemporalConfig(stable_matching=False, smoothing=0.0)
    assert resolve_temporal(True) == TemporalConfig()
    assert resolve_temporal("matching").smoothing == 0.0 and resolve_temporal("smoothing").stable_matching is False
    with pytest.raises(ValueError, match="temporal='sometimes'"):
        resolve_temporal("sometimes")
    with pytest.raises(ValueError, match="0-1 scale"):
        TemporalConfig(motion_threshold=0.0)


# ------------------------------------------------------------------------------------------------ decoding
def test_decoding_streams_every_and_max_frames(tmp_path):
    frames = jittered_frames(7)
    path = tmp_path / "clip.mp4"
    write_video(path, frames)
    info = vio.probe_video(path)
    assert (info.height, info.width) == frames[0].shape[:2] and info.fps == 10
    got = list(vio.iter_video_frames(path, every=3))
    assert [f.index for f in got] == [0, 3, 6]
    assert [f.time for f in got] == pytest.approx([0.0, 0.3, 0.6])
    for f in got:  # lossless H.264 up to the 4:2:0 chroma subsampling
        assert f.image.shape == frames[0].shape and f.image.dtype == np.uint8
        assert np.abs(f.image.astype(int) - frames[f.index]).mean() < 4
        others = [k for k in range(7) if not np.array_equal(frames[k], frames[f.index])]
        assert all(np.abs(f.image.astype(int) - frames[k]).mean() > np.abs(f.image.astype(int) - frames[f.index]).mean()
                   for k in others)
    assert [f.index for f in vio.iter_video_frames(path, every=2, max_frames=2)] == [0, 2]


def test_writer_round_trip_and_containers(tmp_path):
    frames = [np.full((33, 41, 3), 30 * k, np.uint8) for k in range(4)]  # odd size: padded by one pixel
    for suffix in (".mkv", ".avi", ".weird"):
        out_suffix, fmt, codec = vio.output_format(f"in{suffix}")
        assert out_suffix == (suffix if suffix != ".weird" else ".mp4")
        path = tmp_path / f"o{out_suffix}"
        with vio.VideoWriter(path, 12, fmt, codec) as writer:
            for f in frames:
                writer.write(f)
        assert writer.padded and writer.frames == 4
        back = list(vio.iter_video_frames(path))
        assert len(back) == 4 and back[0].image.shape == (34, 42, 3)
        assert [round(float(b.image[:33, :41].mean())) for b in back] == pytest.approx([0, 30, 60, 90], abs=2)


def test_unreadable_and_missing_videos(tmp_path, monkeypatch):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 50)
    with pytest.raises(vio.VideoError, match="cannot read .*bad.mp4"):
        vio.probe_video(bad)
    with pytest.raises(vio.VideoError, match="not found"):
        list(vio.iter_video_frames(tmp_path / "none.mp4"))
    # truncated: the header survives, the frames do not
    good = tmp_path / "good.mkv"
    write_video(good, jittered_frames(6))
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(good.read_bytes()[:600])
    with pytest.raises(vio.VideoError):
        vio.probe_video(cut)
    with pytest.raises(ValueError, match="every must be"):
        list(vio.iter_video_frames(good, every=0))
    with pytest.raises(ValueError, match="max_frames must be"):
        list(vio.iter_video_frames(good, max_frames=-1))
    monkeypatch.setitem(sys.modules, "av", None)  # the [video] extra missing
    with pytest.raises(ImportError, match=r'pip install "cass_plugins\[video\]"'):
        vio.probe_video(good)


# ------------------------------------------------------------------------------------------------ segment_video
@pytest.fixture(scope="module")
def segmenter():
    with Segmenter(make_tiny_clip(), make_tiny_vfm(), **TINY) as seg:
        yield seg


def per_frame(seg: Segmenter, frames: list[np.ndarray], batch_size: int = 4) -> list:
    """What segment_video runs on, without it: the batched path when the Segmenter has one (batching changes the
    float rounding and so the pick among tied head assignments), else one segment() per frame."""
    if hasattr(seg, "segment_many"):
        return list(seg.segment_many(frames, CLASSES, batch_size=batch_size, maps=False))
    return [seg.segment(f, CLASSES, maps=False) for f in frames]


def flicker(labels: list[torch.Tensor]) -> float:
    return float(np.mean([(a != b).float().mean().item() for a, b in zip(labels, labels[1:])]))


def test_off_equals_per_frame_segment_and_restores(segmenter):
    frames = jittered_frames(3)
    matching_before = segmenter.handle.spectral.config
    out = list(segment_video(segmenter, frames, CLASSES, temporal="off"))
    assert [o.index for o in out] == [0, 1, 2]
    for o, f, r in zip(out, frames, per_frame(segmenter, frames)):
        assert np.array_equal(o.image, f)
        assert torch.equal(o.result.labels, r.labels) and o.result.probs is None
    assert segmenter.handle.spectral.config is matching_before
    assert "text_embeddings" not in vars(segmenter)


def test_stable_matching_property_on_a_jittered_video(segmenter):
    """Per frame and window: the assignment is the previous frame's unless that one costs more than the margin over
    the optimum (all pairings enumerated here, on the cost as the solver saw it)."""
    frames = jittered_frames(6, seed=2)
    margin = 0.05
    out = list(segment_video(segmenter, frames, CLASSES, temporal=TemporalConfig(tie_margin=margin, smoothing=0.0)))
    kept = 0
    for prev, cur in zip(out, out[1:]):
        for mp, mc in zip(prev.result.record["matching"], cur.result.record["matching"]):
            c = mc.cost.double().numpy()
            h = c.shape[0]
            optimum = min(math.fsum(c[p[j], j] for j in range(h)) for p in itertools.permutations(range(h)))
            prev_pairs = mp.pairs.tolist()
            prev_total = math.fsum(c[prev_pairs[j], j] for j in range(h))
            if mc.assignment.tolist() == mp.assignment.tolist():
                kept += 1
            else:
                assert prev_total - optimum > margin
                assert math.fsum(c[mc.pairs[j], j] for j in range(h)) == pytest.approx(optimum, abs=1e-6)
    assert kept > 0  # with this margin some of the jitter's near-ties are kept
    assert out[-1].temporal["stable_matching"] and "reset_fraction" not in out[-1].temporal


def test_smoothing_matches_float64_reference_on_a_jittered_video(segmenter):
    frames = jittered_frames(5, seed=3)
    frames[3] = 255 - frames[3]  # a scene cut: everything resets
    config = TemporalConfig(stable_matching=False, smoothing=0.7, motion_threshold=0.2, scene_cut=0.4)
    out = list(segment_video(segmenter, frames, CLASSES, temporal=config))
    raw = per_frame(segmenter, frames)
    vocab_q2c = raw[0].vocabulary.query_to_class_tensor(torch.device("cpu"))
    pipe = segmenter.config.pipeline
    state = None
    for k, (o, r) in enumerate(zip(out, raw)):
        l = r.logits.double().numpy()
        diff = np.abs(frames[k].astype(np.float64) - frames[k - 1]).mean(2) / 255.0 if k else None
        if k == 0 or diff.mean() > config.scene_cut:
            state, reset = l, 1.0
        else:
            cell = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(diff)[None, None], l.shape[1:])[0, 0]
            moved = cell.numpy() > config.motion_threshold
            state, reset = np.where(moved[None], l, (1 - config.smoothing) * l + config.smoothing * state), moved.mean()
        np.testing.assert_allclose(o.result.logits.double().numpy(), state, rtol=0, atol=1e-5)
        assert o.temporal["reset_fraction"] == pytest.approx(reset)
        # the labels are the Segmenter's decision on the smoothed logits
        ref = labels_at_size(o.result.logits, tuple(o.result.labels.shape), vocab_q2c, logit_scale=pipe.logit_scale,
                             prob_thd=pipe.prob_thd, area_thd=pipe.area_thd)
        assert torch.equal(o.result.labels, ref)
    assert out[3].temporal["reset_fraction"] == 1.0
    assert torch.equal(out[0].result.labels, raw[0].labels)


def test_temporal_consistency_reduces_flicker(segmenter):
    frames = jittered_frames(6)
    off = [o.result.labels for o in segment_video(segmenter, frames, CLASSES, temporal="off")]
    on = [o.result.labels for o in segment_video(segmenter, frames, CLASSES, temporal="on")]
    assert flicker(on) < flicker(off)


@pytest.mark.slow
def test_maps_and_the_batched_path(segmenter):
    class Batched(Segmenter):
        calls: list[int] = []

        def segment_many(self, images, vocabulary=None, *, batch_size=2, maps=True):
            batch = []
            for image in images:  # consumes lazily, as a real batched path would
                batch.append(image)
                if len(batch) == batch_size:
                    self.calls.append(len(batch))
                    yield from (self.segment(b, vocabulary, maps=maps) for b in batch)
                    batch = []
            if batch:
                self.calls.append(len(batch))
                yield from (self.segment(b, vocabulary, maps=maps) for b in batch)

    class OneByOne(Segmenter):
        segment_many = None  # segment_video falls back to segment()

    frames = jittered_frames(5)
    with OneByOne(make_tiny_clip(), make_tiny_vfm(), **TINY) as single:
        plain = list(segment_video(single, frames, CLASSES, temporal="on", maps=True))
    with Batched(make_tiny_clip(), make_tiny_vfm(), **TINY) as batched:
        out = list(segment_video(batched, frames, CLASSES, temporal="on", maps=True, batch_size=2))
        assert Batched.calls == [2, 2, 1]
    for a, b in zip(plain, out):
        assert torch.equal(a.result.labels, b.result.labels) and a.index == b.index
        assert b.result.probs.shape == (4, *frames[0].shape[:2]) and b.result.probs.dtype == torch.float32
        assert torch.equal(b.result.probs.argmax(0), b.result.labels)  # no threshold in this configuration


def test_segment_video_errors_and_early_close(segmenter, tmp_path):
    frames = jittered_frames(3)
    with pytest.raises(ValueError, match="every must be"):
        segment_video(segmenter, frames, CLASSES, every=0)
    with pytest.raises(ValueError, match="max_frames must be"):
        segment_video(segmenter, frames, CLASSES, max_frames=-2)
    with pytest.raises(ValueError, match="no vocabulary"):
        segment_video(segmenter, frames)
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(vio.VideoError):
        segment_video(segmenter, bad, CLASSES)
    with Segmenter(make_tiny_clip(), None, components=["ops", "ota"], **TINY) as no_vfm:  # no spectral distillation: nothing to stabilise
        with pytest.raises(ValueError, match="spectral distillation is off"):
            segment_video(no_vfm, frames, CLASSES, temporal="matching")
        auto = next(iter(segment_video(no_vfm, frames, CLASSES, temporal="on")))
        assert auto.temporal["stable_matching"] is False
    original = segmenter.handle.spectral.config
    with contextlib.closing(segment_video(segmenter, frames, CLASSES, every=2)) as it:
        first = next(it)
        assert first.index == 0 and segmenter.handle.spectral.config is not original
    assert segmenter.handle.spectral.config is original and "text_embeddings" not in vars(segmenter)
    assert [o.index for o in segment_video(segmenter, iter(frames), CLASSES, every=2, max_frames=1)] == [0]


def test_video_file_end_to_end(segmenter, tmp_path):
    frames = jittered_frames(5)
    path = tmp_path / "clip.mkv"
    write_video(path, frames)
    out = list(segment_video(segmenter, path, CLASSES, every=2))
    assert [o.index for o in out] == [0, 2, 4] and out[1].time == pytest.approx(0.2)
    assert out[0].result.labels.shape == frames[0].shape[:2]


# ------------------------------------------------------------------------------------------------ cass-segment
def cli_argv(tmp_path, monkeypatch) -> list[str]:
    import cass_plugins.cli.common as cli_common
    from conftest import TINY_CLIP, _register_tiny_clip

    _register_tiny_clip()
    monkeypatch.setattr(cli_common, "load_vfm", lambda name, weights, **kw: make_tiny_vfm())
    return ["--clip", TINY_CLIP, "--pretrained", "random", "--vfm", "tiny", "--vfm-weights", "random",
            "--device", "cpu", "--set", "short_side=64", "crop=64", "stride=32", "--"]


@pytest.mark.slow
def test_cli_video(tmp_path, monkeypatch):
    import json

    from PIL import Image

    import cass_plugins.cli.segment as cli

    frames = jittered_frames(5)
    path = tmp_path / "clip.mkv"
    write_video(path, frames)
    out = tmp_path / "out"
    assert cli.main(["--classes", CLASSES, "--out", str(out), "--every", "2", "--max-frames", "2", "--frame-labels",
                     "--export", "coco-rle", "--export", "png", *cli_argv(tmp_path, monkeypatch), str(path)]) == 0
    summary = json.loads((out / "clip.json").read_text())
    assert [f["index"] for f in summary["frames"]] == [0, 2] and summary["overlay"] == "clip_overlay.mkv"
    overlay = list(vio.iter_video_frames(out / "clip_overlay.mkv"))
    assert len(overlay) == 2 and overlay[0].image.shape[1] > frames[0].shape[1]  # the legend panel
    coco = json.loads((out / "clip" / "segments.coco.json").read_text())
    assert [im["id"] for im in coco["images"]] == [0, 2]
    labels = {}
    for f in summary["frames"]:
        lab = np.asarray(Image.open(out / "clip_labels" / f"{f['index']:06d}.png")).astype(np.int64)
        labels[f["index"]] = lab
        counts = np.bincount(lab.ravel(), minlength=4) / lab.size
        assert np.allclose([f["areas"][c] for c in summary["classes"]], counts)
        for ann in (a for a in coco["annotations"] if a["image_id"] == f["index"]):
            assert np.array_equal(vio_decode(ann), lab == ann["category_id"] - 1)
            name = summary["classes"][ann["category_id"] - 1]
            png = np.asarray(Image.open(out / "clip" / f"{f['index']:06d}" / f"{name}.png"))
            assert np.array_equal(png == 255, lab == ann["category_id"] - 1)
    assert summary["flicker"] == pytest.approx((labels[0] != labels[2]).mean())
    assert summary["temporal"]["smoothing"] == 0.5


def vio_decode(ann: dict) -> np.ndarray:
    from cass_plugins.pipeline.export import rle_decode

    return rle_decode(ann["segmentation"])


@pytest.mark.parametrize("extra, message", [
    (["--every", "0"], "--every must be >= 1"),
    (["--max-frames", "-3"], "--max-frames must be >= 1"),
    (["--temporal", "off", "--smoothing", "0.3"], "--smoothing has no effect with --temporal off"),
    (["--smoothing", "1.5"], "smoothing (β of the moving average) must lie in [0, 1)"),
])
def test_cli_video_errors(tmp_path, capsys, extra, message):
    import cass_plugins.cli.segment as cli

    path = tmp_path / "clip.mkv"
    write_video(path, jittered_frames(2, size=8))
    with pytest.raises(SystemExit) as info:
        cli.main(["--classes", CLASSES, "--out", str(tmp_path / "o"), *extra, str(path)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_video_input_errors(tmp_path, capsys, monkeypatch):
    from PIL import Image

    import cass_plugins.cli.segment as cli

    Image.fromarray(jittered_frames(1, size=8)[0]).save(tmp_path / "a.png")
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x01" * 300)
    cases = [
        ([str(tmp_path / "a.png"), "--every", "2"], "--every applies to video inputs only"),
        ([str(tmp_path / "bad.mp4")], "cannot read"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            cli.main(["--classes", CLASSES, "--out", str(tmp_path / "o"), *argv])
        assert info.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(SystemExit):
        cli.main(["--classes", CLASSES, "--out", str(tmp_path / "o"), str(tmp_path / "bad.mp4")])
    assert 'pip install "cass_plugins[video]"' in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
