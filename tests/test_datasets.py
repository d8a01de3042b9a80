"""Dataset readers on tiny synthetic copies of the eight mmseg layouts (protocol.md §1–§2)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cass_plugins.evaluation.datasets import (
    DATASETS,
    SegmentationDataset,
    coco_object_lut,
    coco_stuff_lut,
    convert_coco_labels,
    get_dataset_info,
    load_label,
)

W, H = 8, 6
CLASS_DIR = Path(__file__).resolve().parents[1] / "cass_plugins" / "data" / "classes"


def _image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def _label(path: Path, arr: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr.astype(np.uint8))
    if palette:
        # putpalette turns the 'L' image into 'P' with the values as indices; the colours are unrelated to the
        # indices, so a reader that decoded colours instead of indices would fail the tests.
        img.putpalette([(7 * i + 50) % 256 for i in range(256)] * 3)
    img.save(path)


def _grid(values: list[int]) -> np.ndarray:
    """An H×W label whose first row starts with the given values (rest filled with the first value)."""
    arr = np.full((H, W), values[0], dtype=np.uint8)
    arr[0, : len(values)] = values
    return arr


# ---------------------------------------------------------------------------------------------------------------
# Layout builders (data folder = tmp_path; each writes the conventional root below it)


def _voc2012(data: Path, arr: np.ndarray) -> Path:
    root = data / "VOCdevkit" / "VOC2012"
    for i, name in enumerate(["2007_000033", "2007_000042", "2007_000061"]):
        _image(root / "JPEGImages" / f"{name}.jpg", i)
        _label(root / "SegmentationClass" / f"{name}.png", arr, palette=True)
    split = root / "ImageSets" / "Segmentation" / "val.txt"
    split.parent.mkdir(parents=True)
    # Trailing blanks and a blank line: names are stripped and empty lines skipped; the third image is not listed.
    split.write_text("2007_000042 \n\n2007_000033\n")
    return root


def _voc2010(data: Path, arr: np.ndarray) -> Path:
    root = data / "VOCdevkit" / "VOC2010"
    for i, name in enumerate(["2008_000002", "2008_000007"]):
        _image(root / "JPEGImages" / f"{name}.jpg", i)
        _label(root / "SegmentationClassContext" / f"{name}.png", arr)
    split = root / "ImageSets" / "SegmentationContext" / "val.txt"
    split.parent.mkdir(parents=True)
    split.write_text("2008_000002\n2008_000007")
    return root


def _coco(data: Path, raw: np.ndarray) -> Path:
    root = data / "coco_stuff164k"
    for i, stem in enumerate(["000000000285", "000000000139"]):
        _image(root / "images" / "val2017" / f"{stem}.jpg", i)
        _label(root / "annotations" / "val2017" / f"{stem}.png", raw)
    return root


def _cityscapes(data: Path, arr: np.ndarray) -> Path:
    root = data / "cityscapes"
    for i, (city, stem) in enumerate([("lindau", "lindau_000001_000019"), ("frankfurt", "frankfurt_000000_000294")]):
        _image(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", i)
        _label(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png", arr)
        # The other gtFine files sit next to it and must not be picked up.
        _label(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", arr + 7)
    # Hidden files (macOS resource forks) are skipped by the scan.
    _image(root / "leftImg8bit" / "val" / "lindau" / "._lindau_000001_000019_leftImg8bit.png")
    return root


def _ade(data: Path, arr: np.ndarray) -> Path:
    root = data / "ade" / "ADEChallengeData2016"
    for i, stem in enumerate(["ADE_val_00000002", "ADE_val_00000001"]):
        _image(root / "images" / "validation" / f"{stem}.jpg", i)
        _label(root / "annotations" / "validation" / f"{stem}.png", arr)
    return root


# ---------------------------------------------------------------------------------------------------------------
# Registry


def test_registry_matches_protocol_table() -> None:
    expected = {  # name: (num_classes, reduce_zero_label, split file?, label suffix) — protocol §1 table
        "voc21": (21, False, True, ".png"),
        "voc20": (20, True, True, ".png"),
        "context60": (60, False, True, ".png"),
        "context59": (59, True, True, ".png"),
        "coco_object": (81, False, False, "_instanceTrainIds.png"),
        "coco_stuff164k": (171, False, False, "_labelTrainIds.png"),
        "cityscapes": (19, False, False, "_gtFine_labelTrainIds.png"),
        "ade20k": (150, True, False, ".png"),
    }
    assert set(DATASETS) == set(expected)
    for name, (n, rzl, has_split, seg_suffix) in expected.items():
        info = DATASETS[name]
        assert (info.num_classes, info.reduce_zero_label, info.split_file is not None, info.seg_suffix) == (
            n, rzl, has_split, seg_suffix)
    assert get_dataset_info("city_scapes") is DATASETS["cityscapes"]
    with pytest.raises(KeyError, match="voc21"):
        get_dataset_info("pascal")


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_class_file_has_one_line_per_class(name: str) -> None:
    info = DATASETS[name]
    path = CLASS_DIR / f"{info.class_file}.txt"
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    assert len(path.read_text().split("\n")) == info.num_classes


# ---------------------------------------------------------------------------------------------------------------
# Label encodings


def test_voc21_palette_indices_and_split(tmp_path: Path) -> None:
    arr = _grid([0, 1, 15, 20, 255])
    root = _voc2012(tmp_path, arr)
    # The palette PNG rendered as colours differs from its indices: the reader must return indices.
    with Image.open(root / "SegmentationClass" / "2007_000033.png") as img:
        assert img.mode == "P"
        assert not np.array_equal(np.array(img.convert("L")), arr)
    ds = SegmentationDataset("voc21", root)
    assert len(ds) == 2
    assert [ds[i]["name"] for i in range(2)] == ["2007_000042", "2007_000033"]
    item = ds[1]
    assert item["image_path"] == root / "JPEGImages" / "2007_000033.jpg"
    assert item["label"].dtype == torch.int64 and item["label"].shape == (H, W)
    assert item["label"][0, :5].tolist() == [0, 1, 15, 20, 255]
    assert torch.equal(item["label"], torch.from_numpy(arr.astype(np.int64)))


def test_voc20_background_becomes_ignore(tmp_path: Path) -> None:
    root = _voc2012(tmp_path, _grid([0, 1, 15, 20, 255]))
    label = SegmentationDataset("voc20", root)[0]["label"]
    assert label[0, :5].tolist() == [255, 0, 14, 19, 255]  # 0→ignore, k→k−1, 255 stays
    assert (label[1:] == 255).all()  # the rest of the grid was background


def test_context60_and_context59(tmp_path: Path) -> None:
    root = _voc2010(tmp_path, _grid([0, 1, 30, 59]))
    # Passing the data folder finds the conventional root VOCdevkit/VOC2010 below it.
    c60 = SegmentationDataset("context60", tmp_path)
    assert c60.root == root and len(c60) == 2
    assert c60[0]["label"][0, :4].tolist() == [0, 1, 30, 59]
    c59 = SegmentationDataset("context59", root)
    assert c59[1]["label"][0, :4].tolist() == [255, 0, 29, 58]


def test_ade20k_reduce_zero_label_and_scan_order(tmp_path: Path) -> None:
    root = _ade(tmp_path, _grid([0, 1, 2, 150, 255]))
    ds = SegmentationDataset("ade20k", root)
    assert [ds[i]["name"] for i in range(len(ds))] == ["ADE_val_00000001", "ADE_val_00000002"]
    assert ds[0]["label"][0, :5].tolist() == [255, 0, 1, 149, 255]


def test_cityscapes_recursive_scan(tmp_path: Path) -> None:
    arr = _grid([0, 18, 255, 7])
    root = _cityscapes(tmp_path, arr)
    ds = SegmentationDataset("cityscapes", root)
    assert [ds[i]["name"] for i in range(len(ds))] == [
        "frankfurt/frankfurt_000000_000294", "lindau/lindau_000001_000019"]
    item = ds[1]
    assert item["label_path"] == root / "gtFine/val/lindau/lindau_000001_000019_gtFine_labelTrainIds.png"
    assert item["label"][0, :4].tolist() == [0, 18, 255, 7]


# COCO category ids (1-based) of the 80 "thing" classes, written out independently of the converter's table.
_COCO_THING_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]


def test_coco_luts_against_category_ids() -> None:
    assert len(_COCO_THING_IDS) == 80
    obj, stuff = coco_object_lut(), coco_stuff_lut()
    for k, cat in enumerate(_COCO_THING_IDS):  # raw stuffthingmaps value = category id − 1
        assert obj[cat - 1] == k + 1
        assert stuff[cat - 1] == k
    # Hand-worked: person (raw 0) → 1, stop sign (raw 12) → 12, toothbrush (raw 89) → 80.
    assert (obj[0], obj[12], obj[89]) == (1, 12, 80)
    # Stuff ids 91..181 → train ids 80..170, background in COCO-Object; unlabeled 255 → background / ignore.
    assert stuff[91] == 80 and stuff[181] == 170 and stuff[255] == 255
    assert obj[91] == 0 and obj[181] == 0 and obj[255] == 0


def test_coco_object_and_stuff_conversion(tmp_path: Path) -> None:
    raw = _grid([0, 12, 89, 91, 181, 255])
    root = _coco(tmp_path, raw)
    assert convert_coco_labels(root, "object") == 2
    assert convert_coco_labels(root, "object") == 0  # existing outputs are kept
    assert convert_coco_labels(root, "stuff") == 2
    obj = SegmentationDataset("coco_object", root)
    assert [obj[i]["name"] for i in range(len(obj))] == ["000000000139", "000000000285"]
    assert obj[0]["label"][0, :6].tolist() == [1, 12, 80, 0, 0, 0]
    assert obj[0]["label_path"].name == "000000000139_instanceTrainIds.png"
    stuff = SegmentationDataset("coco_stuff164k", root)
    assert stuff[1]["label"][0, :6].tolist() == [0, 11, 79, 80, 170, 255]


def test_load_label_rejects_rgb(tmp_path: Path) -> None:
    path = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(path)
    with pytest.raises(ValueError, match="single-channel"):
        load_label(path)


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_missing_root_and_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SegmentationDataset("voc21", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"JPEGImages.*layout.*SegmentationClass.*VOCdevkit/VOC2012"):
        SegmentationDataset("voc21", tmp_path)
    root = _voc2012(tmp_path, _grid([0]))
    (root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"split file .*val\.txt"):
        SegmentationDataset("voc21", root)
    for p in (root / "SegmentationClass").iterdir():
        p.unlink()
    (root / "SegmentationClass").rmdir()
    with pytest.raises(FileNotFoundError, match="label folder .*SegmentationClass"):
        SegmentationDataset("voc21", root)


def test_missing_label_file_is_named(tmp_path: Path) -> None:
    root = _ade(tmp_path, _grid([0]))
    missing = root / "annotations" / "validation" / "ADE_val_00000002.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 2 label files missing, first: .*ADE_val_00000002\.png"):
        SegmentationDataset("ade20k", root)
    ds = SegmentationDataset("ade20k", root, check_files=False)
    ds[0]
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ds[1]


def test_unconverted_coco_object_hints_at_conversion(tmp_path: Path) -> None:
    root = _coco(tmp_path, _grid([0]))
    with pytest.raises(FileNotFoundError, match="_instanceTrainIds.png.*convert_coco_labels"):
        SegmentationDataset("coco_object", root)


def test_empty_split_and_empty_scan(tmp_path: Path) -> None:
    root = _voc2010(tmp_path, _grid([0]))
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="lists no images"):
        SegmentationDataset("context59", root)
    city = tmp_path / "cityscapes"
    (city / "leftImg8bit" / "val" / "lindau").mkdir(parents=True)
    (city / "gtFine" / "val").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no '\*_leftImg8bit.png' files"):
        SegmentationDataset("cityscapes", city)
