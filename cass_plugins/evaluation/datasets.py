"""Readers for the mmseg folder layouts of the eight open-vocabulary segmentation benchmarks.

The layouts, suffixes and label encodings follow the mmseg 1.x configs used by SCLIP / NACLIP / CASS
(protocol.md §1–§2), restated without mmseg:

* images and labels are paired by swapping the image suffix for the label suffix;
* with a split file, each stripped line ``<name>`` gives ``img_dir/<name><img_suffix>``; without one, ``img_dir`` is
  scanned recursively (hidden entries skipped) and sorted by image path;
* labels are read with PIL as raw indices (palette PNGs give their indices, never colours), are not resized, and
  use 255 as the ignore index; ``reduce_zero_label`` (VOC20, Context59, ADE20K) maps 0→255 and k→k−1.

COCO-Object labels (``*_instanceTrainIds.png``) are derived from the raw COCO-Stuff ``stuffthingmaps`` PNGs;
:func:`convert_coco_labels` writes them (and COCO-Stuff ``*_labelTrainIds.png``) with the table of protocol §2.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import torch
from PIL import Image

__all__ = [
    "ALIASES",
    "COCO_STUFF_UNUSED_IDS",
    "DATASETS",
    "DatasetInfo",
    "IGNORE_INDEX",
    "PreparedImages",
    "SegmentationDataset",
    "coco_object_lut",
    "coco_stuff_lut",
    "convert_coco_labels",
    "get_dataset_info",
    "load_label",
    "reduce_zero_label",
]

IGNORE_INDEX = 255


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of one benchmark's validation split (protocol.md §1, §11).

    Attributes:
        name: registry key, also the stem of the class-name file.
        display_name: column name used in the papers' tables.
        num_classes: number of evaluated classes (label values 0..num_classes−1).
        class_file: stem of ``cass_plugins/data/classes/<class_file>.txt``.
        data_root: conventional dataset root, relative to a data folder (mmseg data-prep layout).
        img_dir: image folder relative to the dataset root.
        ann_dir: label folder relative to the dataset root.
        img_suffix: image file suffix (swapped for ``seg_suffix`` to find the label).
        seg_suffix: label file suffix.
        split_file: split list relative to the dataset root, or None to scan ``img_dir`` recursively.
        reduce_zero_label: map label 0→255 and k→k−1 after loading.
        has_background: class 0 is a background class (the ``prob_thd`` fallback class).
        short_side: CASS-official resize short side S (``Resize(scale=(2048, S))``).
        num_images: expected number of validation images (500 and 2000 are from memory in the spec).
        label_hint: how the label files are produced, shown when they are missing.
    """

    name: str
    display_name: str
    num_classes: int
    class_file: str
    data_root: str
    img_dir: str
    ann_dir: str
    img_suffix: str
    seg_suffix: str
    split_file: str | None
    reduce_zero_label: bool
    has_background: bool
    short_side: int
    num_images: int
    label_hint: str

    def layout(self) -> str:
        """One-line description of the expected folder layout under the dataset root."""
        parts = [
            f"<root>/{self.img_dir}/" + ("" if self.split_file else "**/") + f"*{self.img_suffix}",
            f"<root>/{self.ann_dir}/" + ("" if self.split_file else "**/") + f"*{self.seg_suffix}",
        ]
        parts.append(f"<root>/{self.split_file}" if self.split_file else "no split file (recursive scan)")
        return f"{'; '.join(parts)}; conventional <root> = '{self.data_root}'"


_VOC_HINT = "VOC2012 SegmentationClass palette PNGs (from the VOCtrainval_11-May-2012 archive)"
_CONTEXT_HINT = (
    "produced from trainval_merged.json by mmseg's tools/dataset_converters/pascal_context.py "
    "(Detail API), which also writes ImageSets/SegmentationContext/val.txt"
)

DATASETS: dict[str, DatasetInfo] = {
    "voc21": DatasetInfo(
        "voc21", "V21", 21, "voc21", "VOCdevkit/VOC2012", "JPEGImages", "SegmentationClass", ".jpg", ".png",
        "ImageSets/Segmentation/val.txt", False, True, 336, 1449, _VOC_HINT,
    ),
    "voc20": DatasetInfo(
        "voc20", "V20", 20, "voc20", "VOCdevkit/VOC2012", "JPEGImages", "SegmentationClass", ".jpg", ".png",
        "ImageSets/Segmentation/val.txt", True, False, 336, 1449, _VOC_HINT,
    ),
    "context60": DatasetInfo(
        "context60", "PC60", 60, "context60", "VOCdevkit/VOC2010", "JPEGImages", "SegmentationClassContext",
        ".jpg", ".png", "ImageSets/SegmentationContext/val.txt", False, True, 336, 5105, _CONTEXT_HINT,
    ),
    "context59": DatasetInfo(
        "context59", "PC59", 59, "context59", "VOCdevkit/VOC2010", "JPEGImages", "SegmentationClassContext",
        ".jpg", ".png", "ImageSets/SegmentationContext/val.txt", True, False, 336, 5105, _CONTEXT_HINT,
    ),
    "coco_object": DatasetInfo(
        "coco_object", "Obj", 81, "coco_object", "coco_stuff164k", "images/val2017", "annotations/val2017",
        ".jpg", "_instanceTrainIds.png", None, False, True, 336, 5000,
        "produced from the raw stuffthingmaps PNGs by cass_plugins.evaluation.datasets.convert_coco_labels(root, 'object') "
        "(same table as datasets/cvt_coco_object.py)",
    ),
    "coco_stuff164k": DatasetInfo(
        "coco_stuff164k", "Stuff", 171, "coco_stuff164k", "coco_stuff164k", "images/val2017", "annotations/val2017",
        ".jpg", "_labelTrainIds.png", None, False, False, 336, 5000,
        "produced from the raw stuffthingmaps PNGs by cass_plugins.evaluation.datasets.convert_coco_labels(root, 'stuff') "
        "or mmseg's tools/dataset_converters/coco_stuff164k.py",
    ),
    "cityscapes": DatasetInfo(
        "cityscapes", "City", 19, "cityscapes", "cityscapes", "leftImg8bit/val", "gtFine/val",
        "_leftImg8bit.png", "_gtFine_labelTrainIds.png", None, False, False, 560, 500,
        "produced by mmseg's tools/dataset_converters/cityscapes.py (cityscapesscripts json2labelImg, trainIds)",
    ),
    "ade20k": DatasetInfo(
        "ade20k", "ADE", 150, "ade20k", "ade/ADEChallengeData2016", "images/validation", "annotations/validation",
        ".jpg", ".png", None, True, False, 336, 2000, "ADEChallengeData2016 annotations (0 = other)",
    ),
}

# Spellings used by the original repos' config / class-file names.
ALIASES: dict[str, str] = {
    "city_scapes": "cityscapes",
    "coco_stuff": "coco_stuff164k",
    "ade": "ade20k",
}


def get_dataset_info(name: str) -> DatasetInfo:
    """Look up a benchmark by registry name or alias.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    key = ALIASES.get(name, name)
    if key not in DATASETS:
        known = ", ".join(sorted(DATASETS) + sorted(ALIASES))
        raise KeyError(f"unknown dataset {name!r}; known: {known}")
    return DATASETS[key]


# ----------------------------------------------------------------------------------------------------------------
# Label decoding


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label on a uint8 label map: 0→255, 255→255, k→k−1 for 1 ≤ k ≤ 254."""
    out = label.astype(np.uint8, copy=True)
    out[out == 0] = 255
    out -= 1  # uint8 wrap-around is intended: 255 becomes 254 and is restored below
    out[out == 254] = 255
    return out


def load_label(path: str | os.PathLike, reduce_zero: bool = False) -> np.ndarray:
    """Read a label PNG as raw indices (H, W) uint8, as mmseg's pillow 'unchanged' loader does.

    Palette ('P') PNGs yield their stored indices; no EXIF transpose, no resizing.

    Raises:
        ValueError: the file is not a single-channel index image or holds values above 255.
    """
    with Image.open(path) as img:
        mode = img.mode
        arr = np.array(img)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise ValueError(
            f"label {path} has mode {mode!r} and shape {arr.shape}; expected a single-channel index PNG "
            "(mode 'L' or palette 'P'), not a colour rendering"
        )
    if arr.dtype != np.uint8:
        # mmseg would wrap such values with astype(uint8); a 16-bit label is a data error we refuse to hide.
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"label {path} (mode {mode!r}) has values outside 0..255")
        arr = arr.astype(np.uint8)
    return reduce_zero_label(arr) if reduce_zero else arr


# ----------------------------------------------------------------------------------------------------------------
# Dataset


def _scan(img_dir: Path, suffix: str) -> list[str]:
    """Relative paths (posix, suffix removed) of files under img_dir ending in suffix, sorted by path."""
    names: list[str] = []
    for dirpath, dirnames, filenames in os.walk(img_dir, followlinks=True):
        # Hidden entries are skipped, as mmengine's list_dir_or_file does (and macOS '._*' files are noise).
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(img_dir)
        for f in filenames:
            if not f.startswith(".") and f.endswith(suffix):
                names.append((rel / f[: -len(suffix)]).as_posix())
    # mmseg sorts by the full image path string; all share the prefix, so sorting the names is equivalent.
    return sorted(names, key=lambda n: n + suffix)


class SegmentationDataset(torch.utils.data.Dataset):
    """One benchmark's validation split read from its mmseg folder layout.

    Items are ``dict(name=str, image_path=Path, label_path=Path, label=LongTensor (H, W))`` where the label is
    at the original resolution with 255 = ignore. Images are not decoded here (see ``cass_plugins.pipeline.image``).

    Args:
        name: registry name or alias (see :data:`DATASETS`).
        root: the dataset root (e.g. ``.../VOCdevkit/VOC2012``) or a data folder holding the conventional root
            (e.g. ``data`` containing ``VOCdevkit/VOC2012``).
        check_files: verify at construction that every image and label file exists.

    Raises:
        FileNotFoundError: root, image/label folder, split file, or a listed image/label file is missing.
        ValueError: the split lists no images or the scan found none.
    """

    def __init__(self, name: str, root: str | os.PathLike, *, check_files: bool = True) -> None:
        self.info = get_dataset_info(name)
        self.root = self._resolve_root(Path(root))
        info = self.info
        self.img_dir = self.root / info.img_dir
        self.ann_dir = self.root / info.ann_dir
        if not self.ann_dir.is_dir():
            raise FileNotFoundError(
                f"{info.name}: label folder {self.ann_dir} not found ({info.label_hint}). "
                f"Expected layout: {info.layout()}"
            )
        if info.split_file is not None:
            split = self.root / info.split_file
            if not split.is_file():
                raise FileNotFoundError(
                    f"{info.name}: split file {split} not found. Expected layout: {info.layout()}"
                )
            # Blank lines are skipped (mmseg would turn them into a bogus '<img_dir>/.jpg' entry).
            self.names = [s for s in (line.strip() for line in split.read_text().splitlines()) if s]
            if not self.names:
                raise ValueError(f"{info.name}: split file {split} lists no images")
        else:
            self.names = _scan(self.img_dir, info.img_suffix)
            if not self.names:
                raise ValueError(
                    f"{info.name}: no '*{info.img_suffix}' files found under {self.img_dir}. "
                    f"Expected layout: {info.layout()}"
                )
        if check_files:
            self._check_files()

    def _resolve_root(self, root: Path) -> Path:
        info = self.info
        if not root.is_dir():
            raise FileNotFoundError(
                f"{info.name}: dataset root {root} does not exist. Expected layout: {info.layout()}"
            )
        candidates = [root, root / info.data_root]
        for cand in candidates:
            if (cand / info.img_dir).is_dir():
                return cand
        tried = " or ".join(str(c / info.img_dir) for c in candidates)
        raise FileNotFoundError(
            f"{info.name}: image folder not found (looked for {tried}). Expected layout: {info.layout()}"
        )

    def _check_files(self) -> None:
        info = self.info
        for kind, paths in (("image", map(self.image_path, range(len(self)))),
                            ("label", map(self.label_path, range(len(self))))):
            missing = [p for p in paths if not p.is_file()]
            if missing:
                hint = f" ({info.label_hint})" if kind == "label" else ""
                raise FileNotFoundError(
                    f"{info.name}: {len(missing)} of {len(self)} {kind} files missing, first: {missing[0]}{hint}"
                )

    def image_path(self, index: int) -> Path:
        """Path of the index-th image."""
        return self.img_dir / (self.names[index] + self.info.img_suffix)

    def label_path(self, index: int) -> Path:
        """Path of the index-th label PNG."""
        return self.ann_dir / (self.names[index] + self.info.seg_suffix)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        label_path = self.label_path(index)
        if not label_path.is_file():
            raise FileNotFoundError(f"{self.info.name}: label file {label_path} not found ({self.info.label_hint})")
        label = load_label(label_path, self.info.reduce_zero_label)
        return {
            "name": self.names[index],
            "image_path": self.image_path(index),
            "label_path": label_path,
            "label": torch.from_numpy(label.astype(np.int64)),
        }

    def __repr__(self) -> str:
        return f"SegmentationDataset({self.info.name!r}, root={str(self.root)!r}, n={len(self)})"


class PreparedImages(torch.utils.data.Dataset):
    """Items ``indices[k]`` of a :class:`SegmentationDataset` with the image decoded, resized and CLIP-normalised
    (:func:`~cass_plugins.pipeline.segmenter.prepare_image`), for ``DataLoader`` workers: ``dict(name, label,
    image)`` where ``image`` is a :class:`~cass_plugins.pipeline.segmenter.PreparedImage` (pinned by
    ``pin_memory=True``), or the image's path when ``short_side`` is ``None`` (the segmenter decodes it itself).
    """

    def __init__(self, dataset: SegmentationDataset, indices: Iterable[int], short_side: int | None,
                 max_long_side: int = 2048) -> None:
        self.dataset, self.indices = dataset, list(indices)
        self.short_side, self.max_long_side = short_side, max_long_side

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        from cass_plugins.pipeline.segmenter import prepare_image  # the pipeline loads models; import on use

        item = self.dataset[self.indices[k]]
        path = item["image_path"]
        image = path if self.short_side is None else prepare_image(path, self.short_side, self.max_long_side)
        return {"name": item["name"], "label": item["label"], "image": image}


# ----------------------------------------------------------------------------------------------------------------
# COCO-Stuff / COCO-Object label conversion (protocol §2)

# 0-based raw COCO ids that never occur in stuffthingmaps (all are "thing" ids ≤ 90).
COCO_STUFF_UNUSED_IDS: tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


def coco_stuff_lut() -> np.ndarray:
    """256-entry uint8 table raw stuffthingmaps id → COCO-Stuff train id (0..170; 255 stays 255).

    Ids absent from the source table (the unused ones and 182..254) keep their value, as the converters only
    rewrite the listed keys; they never occur in the data.
    """
    lut = np.arange(256, dtype=np.uint8)
    used = [i for i in range(182) if i not in COCO_STUFF_UNUSED_IDS]
    lut[used] = np.arange(len(used), dtype=np.uint8)
    return lut


def coco_object_lut() -> np.ndarray:
    """256-entry uint8 table raw stuffthingmaps id → COCO-Object label (things 1..80, stuff and 255 → 0).

    As in ``cvt_coco_object.py``: every key of the COCO-Stuff table becomes train id + 1, then every key > 90
    (all stuff ids and 255 = unlabeled) becomes background, not ignore. Non-keys keep their value.
    """
    lut = np.arange(256, dtype=np.uint8)
    used = [i for i in range(182) if i not in COCO_STUFF_UNUSED_IDS]
    things = [i for i in used if i <= 90]
    lut[things] = np.arange(1, len(things) + 1, dtype=np.uint8)
    lut[[i for i in used if i > 90] + [255]] = 0
    return lut


def convert_coco_labels(
    root: str | os.PathLike,
    kind: Literal["object", "stuff"] = "object",
    splits: Iterable[str] = ("val2017",),
    overwrite: bool = False,
) -> int:
    """Write ``<stem>_instanceTrainIds.png`` (kind='object') or ``<stem>_labelTrainIds.png`` (kind='stuff').

    Reads the raw ``<root>/annotations/<split>/*.png`` stuffthingmaps (names containing 'TrainIds' skipped) and
    writes the converted PNG next to each; ``<stem>`` is the file name up to its first '.'.

    Returns:
        number of files written.

    Raises:
        FileNotFoundError: an annotation folder is missing.
        ValueError: unknown kind, or a folder holds no raw PNGs.
    """
    if kind not in ("object", "stuff"):
        raise ValueError(f"kind must be 'object' or 'stuff', got {kind!r}")
    lut = coco_object_lut() if kind == "object" else coco_stuff_lut()
    suffix = "_instanceTrainIds.png" if kind == "object" else "_labelTrainIds.png"
    written = 0
    for split in splits:
        ann = Path(root) / "annotations" / split
        if not ann.is_dir():
            raise FileNotFoundError(f"COCO annotation folder {ann} not found (expected <root>/annotations/{split})")
        raw = sorted(p for p in ann.glob("*.png") if "TrainIds" not in p.name)
        if not raw:
            raise ValueError(f"no raw stuffthingmaps PNGs in {ann}")
        for p in raw:
            out = p.with_name(p.name.split(".")[0] + suffix)
            if out.exists() and not overwrite:
                continue
            Image.fromarray(lut[load_label(p)]).save(out)
            written += 1
    return written
