"""Mask export (issue 14): COCO RLE against pycocotools and hand-worked counts, mask PNGs, dilation, npz round trips."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cass_plugins.pipeline import export
from cass_plugins.pipeline.result import SegmentationResult
from cass_plugins.pipeline.vocabulary import Vocabulary

mask_api = pytest.importorskip("pycocotools.mask")


def reference_decode(counts: list[int], h: int, w: int) -> np.ndarray:
    """COCO's definition, pixel by pixel: runs alternate 0s and 1s (0s first) down the columns."""
    out = np.zeros(h * w, dtype=bool)
    pos, value = 0, False
    for run in counts:
        out[pos:pos + run] = value
        pos += run
        value = not value
    return out.reshape(w, h).T


def masks_under_test() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    blob = np.zeros((7, 11), dtype=bool)
    blob[1:5, 2:9] = True
    return [
        rng.random((13, 17)) > 0.5,          # many short runs: long count differences, negative ones
        blob,                                 # one block, first pixel clear
        ~blob,                                # first pixel set: a leading zero count
        np.zeros((4, 6), dtype=bool),
        np.ones((5, 3), dtype=bool),
        rng.random((1, 40)) > 0.3,
        rng.random((300, 2)) > 0.02,         # long runs: counts above 31 need several 5-bit groups
    ]


def test_hand_worked_rle():
    # column-major read of [[0, 1, 1], [1, 0, 0]]: 0 1 | 1 0 | 1 0 → runs 1, 2, 1, 1, 1; the 4th count is stored as
    # 1 − 2 = −1 (one group 0x1F, 'O'), the 5th as 1 − 1 = 0
    mask = np.array([[0, 1, 1], [1, 0, 0]], dtype=bool)
    rle = export.rle_encode(mask)
    assert rle == {"size": [2, 3], "counts": "121O0"}
    assert np.array_equal(export.rle_decode(rle), mask)
    assert np.array_equal(export.rle_decode({"size": [2, 3], "counts": [1, 2, 1, 1, 1]}), mask)
    # rows and columns are not interchangeable: the transpose has another encoding
    assert export.rle_encode(mask.T)["counts"] != rle["counts"]


@pytest.mark.parametrize("index", range(7))
def test_rle_matches_pycocotools(index):
    mask = masks_under_test()[index]
    ours = export.rle_encode(mask)
    theirs = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert ours["counts"] == theirs["counts"].decode("ascii")
    assert ours["size"] == list(theirs["size"])
    decoded = mask_api.decode({"size": ours["size"], "counts": ours["counts"].encode("ascii")})
    assert np.array_equal(decoded.astype(bool), mask)
    assert np.array_equal(export.rle_decode(ours), mask)
    # pycocotools' uncompressed counts through the reference decoder
    h, w = mask.shape
    flat = mask.T.ravel()
    runs, value, n = [], False, 0
    for v in flat:
        if v != value:
            runs.append(n)
            value, n = v, 0
        n += 1
    runs.append(n)
    assert np.array_equal(reference_decode(runs, h, w), mask)
    assert np.array_equal(export.rle_decode({"size": [h, w], "counts": runs}), mask)


def test_rle_decode_rejects_wrong_size():
    with pytest.raises(ValueError, match="sum to"):
        export.rle_decode({"size": [2, 2], "counts": [1, 2]})


def test_mask_filenames_are_portable_and_unique():
    names = ["sky/clouds", "cat", "Cat", "a: b?", "..", "", "CON", "cat", "straße", "x" * 150]
    files = export.mask_filenames(names)
    assert files == [
        "sky_clouds.png", "cat.png", "Cat_2.png", "a_b.png", "class.png", "class_2.png", "CON_.png", "cat_3.png",
        "straße.png", "x" * 100 + ".png",
    ]
    assert len({f.lower() for f in files}) == len(files)


def test_dilation_is_a_euclidean_disk():
    mask = np.zeros((9, 12), dtype=bool)
    mask[1, 9] = True  # near the top-right corner: the disk is cut by the border
    grown = export.dilate_mask(mask, 2)
    yy, xx = np.mgrid[:9, :12]
    assert np.array_equal(grown, (yy - 1) ** 2 + (xx - 9) ** 2 <= 4)
    assert np.array_equal(export.dilate_mask(mask, 0), mask)
    with pytest.raises(ValueError, match=">= 0"):
        export.dilate_mask(mask, -1)


def make_result(with_probs: bool = True) -> SegmentationResult:
    labels = torch.tensor([[0, 0, 2, 2, 2], [0, 3, 3, 2, 2], [0, 3, 3, 3, 2], [0, 0, 0, 3, 2]])
    vocab = Vocabulary.parse("sky, clouds; tree; car/truck; road")  # class 1 absent
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(4, *labels.shape, generator=g) if with_probs else None
    return SegmentationResult(labels, probs, torch.zeros(5, 4, 5), vocab)


def test_masks_and_pngs_round_trip(tmp_path):
    result = make_result()
    masks = result.masks()
    assert list(masks) == ["sky", "car/truck", "road"]  # present classes, in class order
    for name, i in (("sky", 0), ("car/truck", 2), ("road", 3)):
        assert masks[name].dtype == torch.bool and torch.equal(masks[name], result.labels == i)
    assert len(result.masks(only_present=False)) == 4
    written = result.save_masks(tmp_path / "img", dilate=1)
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == ["car_truck.png", "road.png", "sky.png"]
    for name, i in (("sky", 0), ("car/truck", 2), ("road", 3)):
        img = Image.open(written[name])
        assert img.mode == "L"
        arr = np.asarray(img)
        assert set(np.unique(arr).tolist()) <= {0, 255}
        # 1-px disk = 4-neighbourhood: the reference grows the mask by its four shifts
        m = (result.labels == i).numpy()
        ref = m.copy()
        ref[1:] |= m[:-1]
        ref[:-1] |= m[1:]
        ref[:, 1:] |= m[:, :-1]
        ref[:, :-1] |= m[:, 1:]
        assert np.array_equal(arr == 255, ref)


def test_to_coco_loads_in_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    result = make_result()
    doc = result.to_coco(image_id=7, file_name="frame.png", dilate=0)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    coco = COCO(str(path))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["sky", "tree", "car/truck", "road"]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[7]))
    assert sorted(a["category_id"] for a in anns) == [1, 3, 4]
    for a in anns:
        expected = (result.labels == a["category_id"] - 1).numpy()
        assert np.array_equal(coco.annToMask(a).astype(bool), expected)
        assert a["area"] == expected.sum()
        ys, xs = np.nonzero(expected)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert coco.imgs[7] == {"id": 7, "file_name": "frame.png", "height": 4, "width": 5}
    # dilated: the car mask grows by one pixel into the road's column
    grown = result.to_coco(dilate=1)["annotations"]
    car = next(a for a in grown if a["category_id"] == 3)
    assert export.rle_decode(car["segmentation"])[3, 3]


def test_npz_round_trip(tmp_path):
    result = make_result()
    path = result.save_npz(tmp_path / "maps")  # no suffix added behind the caller's back
    assert path == tmp_path / "maps" and path.is_file()
    with np.load(path, allow_pickle=False) as raw:
        assert raw["probs"].dtype == np.float16 and raw["labels"].dtype == np.uint8
    back = export.load_npz(path)
    assert np.array_equal(back["labels"], result.labels.numpy())
    assert np.allclose(back["probs"].astype(np.float32), result.probs.numpy(), atol=1e-3)
    assert back["class_names"] == ["sky", "tree", "car/truck", "road"]
    assert back["synonyms"][0] == ["sky", "clouds"]
    with pytest.raises(ValueError, match="maps=True"):
        make_result(with_probs=False).save_npz(tmp_path / "x.npz")


def test_format_checks():
    assert export.check_formats(["png", "npz", "png"]) == ("png", "npz")
    with pytest.raises(ValueError, match="unknown export format.*coco-rle"):
        export.check_formats(["jpeg"])
    with pytest.raises(ValueError, match=">= 0"):
        export.check_formats(["png"], dilate=-2)
    with pytest.raises(ValueError, match="--export png"):
        export.check_formats(["npz"], dilate=3)
    with pytest.raises(ValueError, match="classes"):
        export.class_masks(np.array([[0, 5]]), ["a", "b"])


# ------------------------------------------------------------------------------------------------ cass-segment
def test_cli_exports_every_format(tmp_path, monkeypatch):
    from skimage import data

    import cass_plugins.cli.common as cli_common
    import cass_plugins.cli.segment as cli
    from conftest import TINY_CLIP, _register_tiny_clip, make_tiny_vfm

    _register_tiny_clip()
    monkeypatch.setattr(cli_common, "load_vfm", lambda name, weights, **kw: make_tiny_vfm())
    Image.fromarray(data.chelsea()[::4, ::4]).save(tmp_path / "cat.png")
    out = tmp_path / "out"
    classes = "cat; sky/clouds; grass; Cat house"
    argv = ["--classes", classes, "--out", str(out), "--export", "png", "--export", "coco-rle", "--export", "npz",
            "--mask-dilate", "2", "--clip", TINY_CLIP, "--pretrained", "random", "--vfm", "tiny", "--vfm-weights",
            "random", "--device", "cpu", "--set", "short_side=64", "crop=64", "stride=32", "--", str(tmp_path / "cat.png")]
    assert cli.main(argv) == 0
    labels = np.asarray(Image.open(out / "cat_labels.png")).astype(np.int64)
    names = ["cat", "sky/clouds", "grass", "Cat house"]
    files = dict(zip(names, ["cat.png", "sky_clouds.png", "grass.png", "Cat_house.png"]))
    present = sorted(set(np.unique(labels).tolist()))
    assert sorted(p.name for p in (out / "cat").glob("*.png")) == sorted(files[names[i]] for i in present)
    yy, xx = np.mgrid[-2:3, -2:3]
    disk = yy ** 2 + xx ** 2 <= 4
    coco = json.loads((out / "cat" / "segments.coco.json").read_text())
    assert [a["category_id"] for a in coco["annotations"]] == [i + 1 for i in present]
    for i, ann in zip(present, coco["annotations"]):
        # the reference dilation: OR of the mask shifted by every offset of the radius-2 disk
        m = labels == i
        padded = np.pad(m, 2)
        ref = np.zeros_like(m)
        for dy, dx in zip(*np.nonzero(disk)):
            ref |= padded[dy:dy + m.shape[0], dx:dx + m.shape[1]]
        png = np.asarray(Image.open(out / "cat" / files[names[i]])) == 255
        assert np.array_equal(png, ref)
        decoded = mask_api.decode({"size": ann["segmentation"]["size"],
                                   "counts": ann["segmentation"]["counts"].encode("ascii")}).astype(bool)
        assert np.array_equal(decoded, ref)
    npz = export.load_npz(out / "cat" / "maps.npz")
    assert np.array_equal(npz["labels"], labels) and npz["probs"].shape == (4, *labels.shape)
    assert npz["class_names"] == names
    summary = json.loads((out / "cat.json").read_text())
    assert summary["exports"]["mask_files"] == {names[i]: files[names[i]] for i in present}


@pytest.mark.parametrize("argv, message", [
    (["--export", "jpeg"], "invalid choice: 'jpeg'"),
    (["--export", "png", "--mask-dilate", "-1"], "--mask-dilate must be a whole number of pixels >= 0"),
    (["--export", "npz", "--mask-dilate", "3"], "add --export png or --export coco-rle"),
    (["--mask-dilate", "3"], "add --export png"),
])
def test_cli_export_errors_before_any_model(tmp_path, capsys, argv, message):
    import cass_plugins.cli.segment as cli

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as info:
        cli.main(["--classes", "cat; sky", "--out", str(tmp_path / "o"), *argv, str(tmp_path / "a.png")])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
