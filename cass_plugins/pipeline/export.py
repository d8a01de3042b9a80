"""Mask export: binary mask PNGs per class, COCO run-length encoding, compressed ``.npz`` maps (issue 14).

CASS (Kim et al., CVPR 2025) names object removal / inpainting as the application of its masks; inpainting tools take
one 8-bit mask per object (255 = inside, 0 = outside), which :func:`write_mask_pngs` writes per present class.
COCO's run-length encoding (``pycocotools.mask``) is restated here so pycocotools stays a test-only dependency:

* a mask of size ``(h, w)`` is read in column-major (Fortran) order; ``counts`` alternate runs of 0s and 1s and
  always start with the 0s (a leading 0 count when the first pixel is set);
* the compressed string form (pycocotools ``rleToString``) writes each count, from the third on as the difference
  to the count two places earlier, in 5-bit groups, low first, each group + 48 as one ASCII character, with 0x20
  flagging that more groups follow (sign-extended: a group with 0x10 set ends a negative number).

Formats (``--export``): ``png`` (``<folder>/<class>.png`` per present class), ``coco-rle`` (one COCO JSON:
``images``, ``categories``, ``annotations`` with ``iscrowd=1`` RLE segmentations), ``npz`` (``labels`` and
``probs`` as float16, plus the class names).
"""
from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "EXPORT_FORMATS", "check_formats", "mask_filenames", "dilate_mask", "class_masks", "write_mask_pngs",
    "rle_encode", "rle_decode", "coco_annotations", "coco_document", "save_npz", "load_npz",
]

#: The ``--export`` formats.
EXPORT_FORMATS = ("png", "coco-rle", "npz")

# Windows refuses these as file names whatever the extension; the masks must open everywhere.
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_MAX_NAME = 100


def check_formats(formats: Sequence[str], dilate: int = 0) -> tuple[str, ...]:
    """Validate export formats (duplicates dropped, order kept) and ``dilate`` against them.

    Raises:
        ValueError: an unknown format, a negative ``dilate``, or ``dilate > 0`` without a mask format (``png`` or
            ``coco-rle``), where it would have nothing to grow.
    """
    out = tuple(dict.fromkeys(formats))
    unknown = [f for f in out if f not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {', '.join(EXPORT_FORMATS)}")
    _check_dilate(dilate)
    if dilate and not {"png", "coco-rle"} & set(out):
        raise ValueError(
            f"a mask dilation ({dilate} px) applies to the png and coco-rle masks, but the export formats are "
            f"{list(out) or 'none'}; add --export png or --export coco-rle, or drop the dilation"
        )
    return out


def _check_dilate(dilate: int) -> None:
    if isinstance(dilate, bool) or not isinstance(dilate, (int, np.integer)) or dilate < 0:
        raise ValueError(f"mask dilation must be a whole number of pixels >= 0, got {dilate!r}")


def _safe_name(name: str) -> str:
    """One class name as a portable file-name stem: letters, digits, ``-``, ``_``, ``.``; the rest → ``_``."""
    text = unicodedata.normalize("NFC", name).strip()
    text = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    text = re.sub(r"_+", "_", text).strip("._ ")
    if not text:
        text = "class"
    if text.lower().split(".")[0] in _RESERVED:
        text += "_"
    return text[:_MAX_NAME]


def mask_filenames(class_names: Sequence[str]) -> list[str]:
    """A unique, portable file name (``<stem>.png``) per class, in order.

    Characters other than letters, digits, ``-``, ``_`` and ``.`` become ``_`` (``"sky/clouds"`` → ``sky_clouds``),
    names are cut to 100 characters, and names equal up to case (case-insensitive file systems) get ``_2``, ``_3``
    ... in order of appearance.
    """
    seen: set[str] = set()
    out = []
    for name in class_names:
        base = stem = _safe_name(name)
        k = 1
        while stem.lower() in seen:
            k += 1
            stem = f"{base}_{k}"
        seen.add(stem.lower())
        out.append(f"{stem}.png")
    return out


def _as_labels(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be a (H, W) class-index map, got shape {lab.shape}")
    return lab


def dilate_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a boolean mask by ``radius`` pixels (Euclidean disk: every pixel within ``radius`` of the mask)."""
    _check_dilate(radius)
    mask = np.asarray(mask, dtype=bool)
    if radius == 0 or not mask.any():
        return mask.copy()
    from scipy import ndimage

    # distance of every pixel to the nearest mask pixel; exact, and linear in the image size whatever the radius
    return ndimage.distance_transform_edt(~mask) <= radius


def class_masks(
    labels: torch.Tensor | np.ndarray, class_names: Sequence[str], dilate: int = 0, *, only_present: bool = True
) -> dict[str, np.ndarray]:
    """Boolean ``(H, W)`` mask per class (``labels == index``), grown by ``dilate`` pixels; absent classes are left
    out unless ``only_present=False``. Dilated masks of neighbouring classes overlap."""
    _check_dilate(dilate)
    lab = _as_labels(labels)
    if lab.size and (lab.min() < 0 or lab.max() >= len(class_names)):
        raise ValueError(f"labels hold indices {lab.min()}..{lab.max()} but there are {len(class_names)} classes")
    present = set(np.unique(lab).tolist())
    return {
        name: dilate_mask(lab == i, dilate)
        for i, name in enumerate(class_names)
        if not only_present or i in present
    }


def write_mask_pngs(
    folder: str | Path, labels: torch.Tensor | np.ndarray, class_names: Sequence[str], dilate: int = 0
) -> dict[str, Path]:
    """Write ``folder/<class>.png`` (8-bit, 255 inside, 0 outside) for every present class.

    File names come from :func:`mask_filenames` over the whole vocabulary, so a class keeps its file name from
    image to image. Returns class name → path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = dict(zip(class_names, mask_filenames(class_names)))
    written = {}
    for name, mask in class_masks(labels, class_names, dilate).items():
        path = folder / files[name]
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path, format="PNG")
        written[name] = path
    return written


# ------------------------------------------------------------------------------------------------------ COCO RLE
def _run_lengths(mask: np.ndarray) -> list[int]:
    flat = np.asarray(mask, dtype=bool).T.ravel()  # column-major, as COCO reads masks
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    return [0, *runs] if flat[0] else runs


def _counts_to_string(counts: Sequence[int]) -> str:
    chars = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        while True:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: negative differences end in groups of 1s
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr(c + 48 + (0x20 if more else 0)))
            if not more:
                break
    return "".join(chars)


def _string_to_counts(text: str) -> list[int]:
    counts: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_encode(mask: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """COCO compressed RLE of a boolean ``(h, w)`` mask: ``{"size": [h, w], "counts": str}`` (pycocotools'
    ``mask.encode`` output, with ``counts`` decoded to ``str``)."""
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask must be (h, w), got shape {m.shape}")
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": _counts_to_string(_run_lengths(m))}


def rle_decode(rle: Mapping[str, Any]) -> np.ndarray:
    """Boolean ``(h, w)`` mask of a COCO RLE (compressed string or uncompressed list of counts)."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = _string_to_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if sum(runs) != h * w:
        raise ValueError(f"RLE counts sum to {sum(runs)} but the size {h}x{w} has {h * w} pixels")
    values = np.arange(len(runs)) % 2 == 1
    flat = np.repeat(values, runs)
    return flat.reshape(w, h).T.copy()


def coco_annotations(
    labels: torch.Tensor | np.ndarray, class_names: Sequence[str], image_id: int, *, dilate: int = 0,
    first_id: int = 1,
) -> list[dict[str, Any]]:
    """COCO annotations (``iscrowd=1`` RLE) of every present class of one label map; ``category_id`` is the class
    index + 1 (COCO reserves 0), ``bbox`` ``[x, y, w, h]`` and ``area`` of the (dilated) mask."""
    anns = []
    index = {name: i for i, name in enumerate(class_names)}
    for k, (name, mask) in enumerate(class_masks(labels, class_names, dilate).items()):
        ys, xs = np.nonzero(mask)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        anns.append({
            "id": first_id + k, "image_id": int(image_id), "category_id": index[name] + 1,
            "segmentation": rle_encode(mask), "area": float(mask.sum()), "bbox": bbox, "iscrowd": 1,
        })
    return anns


def coco_document(
    images: Sequence[Mapping[str, Any]], class_names: Sequence[str], annotations: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """A COCO JSON document (``pycocotools.coco.COCO`` loads it): ``images`` (``id``, ``file_name``, ``height``,
    ``width``), ``categories`` (``id`` = class index + 1, ``name``) and the annotations."""
    return {
        "images": [dict(im) for im in images],
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(class_names)],
        "annotations": [dict(a) for a in annotations],
    }


# ------------------------------------------------------------------------------------------------------ npz
def save_npz(
    path: str | Path, labels: torch.Tensor | np.ndarray, probs: torch.Tensor | np.ndarray | None,
    class_names: Sequence[str], synonyms: Sequence[Sequence[str]] | None = None,
) -> Path:
    """Write a compressed ``.npz``: ``labels`` (smallest unsigned int type that holds them), ``probs`` ``(C, H, W)``
    float16, ``class_names`` (unicode array) and ``synonyms`` (JSON text). Loads with ``allow_pickle=False``.

    Raises:
        ValueError: ``probs`` missing (a result of ``segment(..., maps=False)``) or not ``(C, H, W)`` for these
            labels and classes.
    """
    lab = _as_labels(labels)
    if probs is None:
        raise ValueError("the npz export holds the per-class probabilities: segment with maps=True to have them")
    p = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    if p.shape != (len(class_names), *lab.shape):
        raise ValueError(f"probs must be (C, H, W) = {(len(class_names), *lab.shape)}, got {p.shape}")
    dtype = np.uint8 if len(class_names) <= 256 else np.uint16 if len(class_names) <= 65536 else np.uint32
    path = Path(path)
    with open(path, "wb") as fh:  # a file object: numpy would append ".npz" to a name without it
        np.savez_compressed(
            fh, labels=lab.astype(dtype), probs=p.astype(np.float16), class_names=np.array(list(class_names), dtype=str),
            synonyms=np.array(json.dumps([list(s) for s in (synonyms or [[c] for c in class_names])])),
        )
    return path


def load_npz(path: str | Path) -> dict[str, Any]:
    """Read :func:`save_npz`'s file: ``labels`` (int64), ``probs`` (float16), ``class_names`` (list), ``synonyms``."""
    with np.load(path, allow_pickle=False) as data:
        return {
            "labels": data["labels"].astype(np.int64), "probs": data["probs"],
            "class_names": [str(n) for n in data["class_names"]], "synonyms": json.loads(str(data["synonyms"])),
        }
