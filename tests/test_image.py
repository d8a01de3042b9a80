"""Image loading, the mmcv resize rule and normalisation, against hand-worked values and float64 references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cass_plugins.pipeline.image import (
    CLIP_MEAN_255,
    CLIP_STD_255,
    IMAGENET_MEAN,
    IMAGENET_STD,
    clip_normalize,
    load_image,
    rescaled_size,
    resize_short_side,
    to_vfm_normalization,
)


def _chw(hwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def _rng_u8(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------- loading


def test_rgb_png_roundtrip(tmp_path):
    rgb = _rng_u8((7, 5, 3))
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    out = load_image(path)
    assert out.dtype == torch.uint8 and out.shape == (3, 7, 5)
    np.testing.assert_array_equal(out.numpy(), _chw(rgb))
    np.testing.assert_array_equal(load_image(str(path)).numpy(), _chw(rgb))


def test_grayscale_png_becomes_three_equal_channels(tmp_path):
    gray = _rng_u8((6, 9))
    path = tmp_path / "gray.png"
    Image.fromarray(gray, mode="L").save(path)
    out = load_image(path).numpy()
    for c in range(3):
        np.testing.assert_array_equal(out[c], gray)


def test_rgba_png_is_composited_on_white(tmp_path):
    rgba = np.array(
        [[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128], [10, 20, 30, 51]]], dtype=np.uint8
    )
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    out = load_image(path).numpy()[:, 0, :].T  # (4 pixels, 3)
    np.testing.assert_array_equal(out[0], [200, 100, 50])  # opaque: colour
    np.testing.assert_array_equal(out[1], [255, 255, 255])  # transparent: white
    # α = 128/255, 255·(1−α) = 127: 200·α + 127 = 227.39 → 227; 100·α + 127 = 177.20 → 177; 50 → 152.10 → 152
    np.testing.assert_array_equal(out[2], [227, 177, 152])
    # α = 0.2: 10·0.2 + 204 = 206, 20·0.2 + 204 = 208, 30·0.2 + 204 = 210
    np.testing.assert_array_equal(out[3], [206, 208, 210])


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 128, 129, 257, 1000, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    out = load_image(path).numpy()
    # round_half_up(x / 257): 128/257 = 0.498 → 0, 129/257 = 0.502 → 1, 1000/257 = 3.89 → 4, 32768/257 = 127.5 → 128
    expected = np.array([[0, 0, 1, 1, 4, 128, 255]], dtype=np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(out[c], expected)


def test_palette_png(tmp_path):
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 17, 34, 51]
    indices = np.array([[0, 1], [2, 3], [3, 0]], dtype=np.uint8)
    img = Image.fromarray(indices, mode="P")
    img.putpalette(palette + [0] * (768 - len(palette)))
    path = tmp_path / "palette.png"
    img.save(path)
    out = load_image(path).numpy()
    table = np.array(palette, dtype=np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(out, _chw(table[indices]))


def test_palette_png_with_transparency_composites_on_white(tmp_path):
    indices = np.array([[0, 1]], dtype=np.uint8)
    img = Image.fromarray(indices, mode="P")
    img.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    img.info["transparency"] = 1
    path = tmp_path / "palette_t.png"
    img.save(path, transparency=1)
    out = load_image(path).numpy()[:, 0, :].T
    np.testing.assert_array_equal(out, [[10, 20, 30], [255, 255, 255]])


def test_cmyk_uses_pil_conversion():
    cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))  # no cyan, full magenta and yellow, no black = red
    np.testing.assert_array_equal(load_image(cmyk).numpy()[:, 0, 0], [255, 0, 0])


def test_exif_orientation_is_applied(tmp_path):
    rgb = _rng_u8((4, 6, 3), seed=3)
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # orientation 6: the stored image must be rotated 90° clockwise for display
    path = tmp_path / "rotated.png"
    img.save(path, exif=exif.tobytes())
    out = load_image(path).numpy()
    np.testing.assert_array_equal(out, _chw(np.rot90(rgb, k=-1)))


def test_numpy_inputs():
    gray = _rng_u8((5, 4))
    np.testing.assert_array_equal(load_image(gray).numpy(), np.stack([gray] * 3))
    np.testing.assert_array_equal(load_image(gray[:, :, None]).numpy(), np.stack([gray] * 3))
    rgb = _rng_u8((5, 4, 3))
    np.testing.assert_array_equal(load_image(rgb).numpy(), _chw(rgb))
    # floats in [0, 1]: round_half_up(x · 255)
    f = np.array([[[0.0, 0.5, 1.0], [0.2, 0.002, 0.998]]], dtype=np.float32)
    np.testing.assert_array_equal(load_image(f).numpy()[:, 0, :].T, [[0, 128, 255], [51, 1, 254]])
    u16 = np.array([[65535, 257]], dtype=np.uint16)
    np.testing.assert_array_equal(load_image(u16).numpy()[0], [[255, 1]])
    rgba = np.zeros((1, 1, 4), dtype=np.uint8)  # transparent black → white
    np.testing.assert_array_equal(load_image(rgba).numpy().ravel(), [255, 255, 255])


def test_tensor_inputs():
    rgb = torch.from_numpy(_rng_u8((3, 5, 4)))
    out = load_image(rgb)
    assert torch.equal(out, rgb)
    assert torch.equal(load_image(rgb.float() / 255), rgb)
    gray = rgb[0]
    assert torch.equal(load_image(gray), gray.expand(3, -1, -1))
    assert torch.equal(load_image(gray[None]), gray.expand(3, -1, -1))


def test_astronaut_matches_skimage():
    skimage_data = pytest.importorskip("skimage.data")
    img = skimage_data.astronaut()
    out = load_image(img)
    assert out.shape == (3, 512, 512)
    np.testing.assert_array_equal(out.numpy(), _chw(img))


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(path)


def test_corrupt_file_message(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match=r"corrupt\.png.*not an image PIL can read"):
        load_image(path)


def test_truncated_file_message(tmp_path):
    full = tmp_path / "full.png"
    Image.fromarray(_rng_u8((64, 64, 3))).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.png.*not an image PIL can read"):
        load_image(cut)


@pytest.mark.parametrize(
    "bad, exc, pattern",
    [
        (np.zeros((4, 4, 5), dtype=np.uint8), ValueError, "shape"),
        (np.zeros((2, 4, 4, 3), dtype=np.uint8), ValueError, "shape"),
        (np.zeros((4, 4), dtype=np.int32), TypeError, "dtype"),
        (np.full((4, 4), 2.0), ValueError, r"\[0, 1\]"),
        (np.full((4, 4), np.nan), ValueError, "NaN"),
        (torch.zeros(5, 4, 3, dtype=torch.uint8), ValueError, "channels-first"),
        (12, TypeError, "accepts"),
    ],
)
def test_bad_inputs(bad, exc, pattern):
    with pytest.raises(exc, match=pattern):
        load_image(bad)


# ------------------------------------------------------------------------------------------------------ resize


@pytest.mark.parametrize(
    "h, w, short, expected",
    [
        (375, 500, 336, (336, 448)),  # VOC 500×375, s = 0.896
        (375, 500, 448, (448, 597)),  # s = 1.19467, 500·s = 597.33
        (1024, 2048, 560, (560, 1120)),  # Cityscapes
        (500, 375, 336, (448, 336)),  # portrait
        (100, 1000, 336, (205, 2048)),  # long-side cap: s = 2.048, 100·s = 204.8 → 205
        (10, 20, 336, (336, 672)),  # upscaling
        (336, 448, 336, (336, 448)),  # already there
    ],
)
def test_rescaled_size(h, w, short, expected):
    assert rescaled_size(h, w, short) == expected


def test_rescaled_size_rounds_half_up():
    # 2×3 image with S = 3: s = 1.5, width 3·1.5 = 4.5 → 5 (round half up, not to even)
    assert rescaled_size(2, 3, 3) == (3, 5)
    assert rescaled_size(2, 5, 3) == (3, 8)  # 7.5 → 8


def test_rescaled_size_rejects_bad_arguments():
    with pytest.raises(ValueError):
        rescaled_size(0, 10, 336)
    with pytest.raises(ValueError):
        rescaled_size(10, 10, 4096, 2048)


def _bilinear_half_pixel_np(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """float64 separable bilinear with half-pixel centres and edge clamping (OpenCV INTER_LINEAR semantics)."""

    def weights(n_in: int, n_out: int) -> np.ndarray:
        m = np.zeros((n_out, n_in))
        scale = n_in / n_out
        for i in range(n_out):
            src = max((i + 0.5) * scale - 0.5, 0.0)
            i0 = min(int(math.floor(src)), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            frac = src - i0 if i0 < n_in - 1 else 0.0
            m[i, i0] += 1 - frac
            m[i, i1] += frac
        return m

    wy, wx = weights(img.shape[-2], out_h), weights(img.shape[-1], out_w)
    return np.einsum("yi,cij,xj->cyx", wy, img.astype(np.float64), wx)


@pytest.mark.parametrize("h, w, short", [(7, 5, 3), (5, 9, 13), (6, 6, 4), (11, 4, 9)])
def test_resize_short_side_matches_float64_bilinear(h, w, short):
    img = _rng_u8((3, h, w), seed=h * w)
    new_h, new_w = rescaled_size(h, w, short)
    ref = _bilinear_half_pixel_np(img, new_h, new_w)

    out_f = resize_short_side(torch.from_numpy(img).double(), short)
    assert out_f.dtype == torch.float64 and out_f.shape == (3, new_h, new_w)
    np.testing.assert_allclose(out_f.numpy(), ref, atol=1e-9)

    out_u8 = resize_short_side(torch.from_numpy(img), short)
    assert out_u8.dtype == torch.uint8
    # float32 interpolation then round-half-up: equal to the rounded reference except exactly at .5 ties
    np.testing.assert_array_less(np.abs(out_u8.numpy() - ref), 0.5 + 1e-4)

    batched = resize_short_side(torch.from_numpy(img)[None].float(), short)
    assert batched.shape == (1, 3, new_h, new_w)


def test_resize_no_antialias_on_downscale():
    # 9 → 3: half-pixel centres land exactly on source columns 1, 4, 7 (all 255); an antialiased resize would
    # average each group of three columns to 85.
    row = np.array([0, 255, 0, 0, 255, 0, 0, 255, 0], dtype=np.float64)
    img = torch.from_numpy(np.tile(row, (3, 9, 1)))
    out = resize_short_side(img, 3)
    np.testing.assert_allclose(out[0, 0].numpy(), [255, 255, 255])


# ------------------------------------------------------------------------------------------------ normalisation


def test_clip_normalize_values():
    img = torch.tensor(CLIP_MEAN_255).view(3, 1, 1).expand(3, 2, 2).clone()
    assert torch.allclose(clip_normalize(img), torch.zeros(3, 2, 2), atol=1e-6)
    u8 = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1)
    expected = [(v - m) / s for v, m, s in zip([0, 128, 255], CLIP_MEAN_255, CLIP_STD_255)]
    out = clip_normalize(u8)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.flatten().numpy(), expected, rtol=1e-6)
    assert clip_normalize(u8[None]).shape == (1, 3, 1, 1)


def test_to_vfm_normalization_matches_direct_formula():
    img = torch.from_numpy(_rng_u8((3, 4, 5), seed=7))
    clip_n = clip_normalize(img.double())
    out = to_vfm_normalization(clip_n)
    x = img.numpy().astype(np.float64) / 255.0
    ref = (x - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-12)
    out32 = to_vfm_normalization(clip_normalize(img))
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, atol=1e-5)
    custom = to_vfm_normalization(clip_n, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    np.testing.assert_allclose(custom.numpy(), 2 * x - 1, atol=1e-12)
