"""Vocabularies: classes, their synonyms ("queries"), and the packaged class-name files.

Every synonym of every class is its own text query (one row of the text classifier); predictions take the max
probability over a class's queries (protocol.md §3). Class index = position in the vocabulary = label index.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources

import torch

__all__ = ["Vocabulary", "BUILTIN_VOCABULARIES", "BUILTIN_METHODS"]

# Packaged class files, named after the datasets (protocol.md §4).
BUILTIN_VOCABULARIES: tuple[str, ...] = (
    "voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff164k", "cityscapes", "ade20k",
)
# The file names used in the authors' repositories, accepted as aliases.
_ALIASES = {"coco_stuff": "coco_stuff164k", "city_scapes": "cityscapes"}

# method -> (sub-folder holding the files that differ, synonym separator, names it has files for).
# SCLIP and NACLIP ship byte-identical files to CASS. ProxyCLIP differs in voc21/voc20/coco_object and splits on
# "; " (baselines.md §3). The other five files are identical across all repos, so every method falls back to them.
# ClearCLIP's voc21/voc20/coco_object are only described in the spec, not given verbatim, so they are not shipped.
_SHARED = ("context60", "context59", "coco_stuff164k", "cityscapes", "ade20k")
_METHODS: dict[str, tuple[str | None, str, tuple[str, ...]]] = {
    "cass": (None, ", ", BUILTIN_VOCABULARIES),
    "sclip": (None, ", ", BUILTIN_VOCABULARIES),
    "naclip": (None, ", ", BUILTIN_VOCABULARIES),
    "proxyclip": ("proxyclip", "; ", BUILTIN_VOCABULARIES),
    "clearclip": (None, ",", _SHARED),
    # CDAM: one name per line, own voc21/coco_object (cdam.md §14; its 80 augmented prompts are not class lines).
    "cdam": ("cdam", ", ", BUILTIN_VOCABULARIES),
}
BUILTIN_METHODS: tuple[str, ...] = tuple(_METHODS)

def _normalise_query(query: str) -> str:
    # The CLIP tokenizer lowercases and collapses whitespace, so these spellings give the same embedding.
    return " ".join(query.split()).lower()


@dataclass(frozen=True)
class Vocabulary:
    """An ordered set of classes, each a tuple of synonyms (the first is the class name).

    Args:
        classes: one tuple of synonyms per class, in label-index order. Lists are converted to tuples.
        allow_duplicates: accept the same query (case/whitespace-insensitive) more than once. Off by default
            because a repeated query is usually a typo; the authors' COCO-Object file needs it ('bed' is both a
            background word and class 60), so the built-in files are loaded with it on.

    Raises:
        ValueError: empty vocabulary, a class without synonyms, an empty/blank name, or a duplicated query.
    """

    classes: tuple[tuple[str, ...], ...]
    allow_duplicates: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.classes, str):
            raise TypeError("Vocabulary(classes=...) takes a sequence of synonym tuples; "
                            "use Vocabulary.parse(str) to parse a string")
        classes = tuple((c,) if isinstance(c, str) else tuple(c) for c in self.classes)
        object.__setattr__(self, "classes", classes)
        if not classes:
            raise ValueError("empty vocabulary: give at least one class, e.g. Vocabulary.parse('cat; dog')")
        seen: dict[str, int] = {}
        for k, synonyms in enumerate(classes):
            if not synonyms:
                raise ValueError(f"class {k} has no names: give at least one name per class")
            for name in synonyms:
                if not isinstance(name, str):
                    raise TypeError(f"class {k}: names must be str, got {type(name).__name__} ({name!r})")
                if not name.strip():
                    raise ValueError(
                        f"empty class name in class {k} ({synonyms!r}): remove the empty entry "
                        "(check for doubled or trailing separators and blank lines)")
                key = _normalise_query(name)
                if key in seen and not self.allow_duplicates:
                    where = "the same class" if seen[key] == k else f"classes {seen[key]} and {k}"
                    raise ValueError(
                        f"duplicate class name {name!r} in {where}: each query must be unique; remove one "
                        "(or pass allow_duplicates=True to keep the authors' behaviour)")
                seen.setdefault(key, k)

    # ------------------------------------------------------------------ properties
    @property
    def class_names(self) -> tuple[str, ...]:
        """The first synonym of every class."""
        return tuple(c[0] for c in self.classes)

    @property
    def queries(self) -> tuple[str, ...]:
        """All synonyms of all classes, flattened in class order (one text embedding each)."""
        return tuple(q for c in self.classes for q in c)

    @property
    def query_to_class(self) -> tuple[int, ...]:
        """Class index of every query (the authors' ``query_idx``)."""
        return tuple(k for k, c in enumerate(self.classes) for _ in c)

    def query_to_class_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``query_to_class`` as a LongTensor of shape (num_queries,)."""
        return torch.tensor(self.query_to_class, dtype=torch.long, device=device)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def num_queries(self) -> int:
        """Number of queries (synonyms of all classes)."""
        return sum(len(c) for c in self.classes)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def parse(cls, spec: Vocabulary | str | Sequence[str | Sequence[str]] | os.PathLike) -> Vocabulary:
        """Build a vocabulary from a user-facing specification.

        Accepted forms:
            * a ``Vocabulary`` (returned as is);
            * a string: ``';'`` (or a newline) separates classes, ``','`` separates synonyms, surrounding spaces
              are stripped, a single trailing ``';'`` is ignored: ``"cat; dog, puppy; sky"``. Note that
              ``"cat, dog"`` is ONE class with two synonyms;
            * a list whose entries are a str (split on ``','`` into synonyms) or a list of synonyms;
            * an ``os.PathLike``: read with :meth:`from_file`.

        Raises:
            ValueError: see the class docstring.
        """
        if isinstance(spec, Vocabulary):
            return spec
        if isinstance(spec, os.PathLike):
            return cls.from_file(spec)
        if isinstance(spec, str):
            entries = re.split(r"[;\n]", spec)
            if len(entries) > 1 and not entries[-1].strip():
                entries = entries[:-1]
            return cls(tuple(_split_synonyms(e) for e in entries))
        if isinstance(spec, Iterable):
            classes = []
            for entry in spec:
                if isinstance(entry, str):
                    classes.append(_split_synonyms(entry))
                elif isinstance(entry, Iterable):
                    classes.append(tuple(_strip(s) for s in entry))
                else:
                    raise TypeError(f"vocabulary entries must be str or lists of str, got {entry!r}")
            return cls(tuple(classes))
        raise TypeError(f"cannot build a Vocabulary from {type(spec).__name__}: give a str, a list or a file path")

    @classmethod
    def from_file(cls, path: str | os.PathLike, sep: str = ", ", *, allow_duplicates: bool = False) -> Vocabulary:
        """Read a class-name file: one class per line, synonyms separated by ``sep``.

        Parsing follows the authors (protocol.md §3): lines are split on ``sep`` exactly and only the newline is
        removed, so Context60's ``'wood '`` keeps its trailing space (harmless: the tokenizer collapses
        whitespace). Leniency (cass.md §9): a piece that still contains the bare separator (e.g. ``"cat,kitten"``
        under ``", "``) is split on it too, with surrounding spaces stripped; a separator without surrounding
        spaces (``sep=","``) strips every piece. A final newline at the end of the file is ignored.
        """
        with open(path, encoding="utf-8") as f:  # text mode: '\r\n' is read as '\n'
            text = f.read()
        return cls._from_text(text, sep, allow_duplicates=allow_duplicates, source=str(path))

    @classmethod
    def builtin(cls, name: str, method: str = "cass") -> Vocabulary:
        """Load a packaged class file, e.g. ``Vocabulary.builtin("voc21")``.

        Args:
            name: one of ``BUILTIN_VOCABULARIES`` (``"coco_stuff"``/``"city_scapes"`` are accepted too).
            method: whose file: ``"cass"``, ``"sclip"``, ``"naclip"`` (identical files), ``"proxyclip"`` (own
                voc21/voc20/coco_object, ``"; "`` separator), ``"clearclip"`` (only the five files shared by
                all repositories; its voc21/voc20/coco_object are not specified verbatim and are not shipped) or
                ``"cdam"`` (own voc21/coco_object, single names; the others are the shared files).
        """
        key = _ALIASES.get(name, name)
        if method not in _METHODS:
            raise ValueError(f"unknown method {method!r}: choose one of {', '.join(BUILTIN_METHODS)}")
        folder, sep, available = _METHODS[method]
        if key not in BUILTIN_VOCABULARIES:
            raise ValueError(f"unknown built-in vocabulary {name!r}: choose one of "
                             f"{', '.join(BUILTIN_VOCABULARIES)}, or load your own with Vocabulary.from_file")
        if key not in available:
            raise ValueError(f"no {method} class file for {key!r} is shipped (the spec does not give its content): "
                             f"use method='cass' or Vocabulary.from_file with the original file")
        # One path component per step: namespace-package paths (MultiplexedPath) take a single child.
        root = resources.files("cass_plugins") / "data" / "classes"
        file = root / folder / f"{key}.txt" if folder else root / f"{key}.txt"
        if not file.is_file():  # the method's folder only holds the files that differ
            file = root / f"{key}.txt"
        text = file.read_text(encoding="utf-8")
        # The authors' files repeat queries (COCO-Object 'bed'); keep them as the authors do.
        # Exactly the authors' split (no leniency): ClearCLIP's ',' keeps Context60's 'wood ' like the others.
        return cls._from_text(text, sep, allow_duplicates=True, source=f"{method}:{key}", lenient=False)

    @classmethod
    def _from_text(cls, text: str, sep: str, *, allow_duplicates: bool, source: str,
                   lenient: bool = True) -> Vocabulary:
        if not sep:
            raise ValueError("empty separator: use ', ' (authors), ',' or '; ' (ProxyCLIP)")
        lines = text.split("\n")
        if len(lines) > 1 and lines[-1] == "":  # a final newline does not start a new class
            lines = lines[:-1]
        bare = sep.strip()
        classes = []
        for line in lines:
            pieces: list[str] = []
            for piece in line.split(sep):
                if not lenient:
                    pieces.append(piece)
                elif bare and bare != sep and bare in piece:
                    pieces.extend(p.strip() for p in piece.split(bare))
                elif bare == sep:
                    pieces.append(piece.strip())
                else:
                    pieces.append(piece)
            classes.append(tuple(pieces))
        try:
            return cls(tuple(classes), allow_duplicates=allow_duplicates)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    # ------------------------------------------------------------------ printing
    def describe(self, max_synonyms: int | None = None) -> str:
        """A multi-line listing: one class per line with its index and synonyms."""
        lines = [f"Vocabulary: {self.num_classes} classes, {self.num_queries} queries"]
        width = len(str(self.num_classes - 1))
        for k, synonyms in enumerate(self.classes):
            shown = synonyms if max_synonyms is None else synonyms[:max_synonyms]
            more = len(synonyms) - len(shown)
            text = ", ".join(repr(s) if s != s.strip() else s for s in shown)
            lines.append(f"  {k:>{width}}: {text}" + (f" (+{more} more)" if more else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        names = ", ".join(self.class_names[:8]) + (", ..." if self.num_classes > 8 else "")
        return f"Vocabulary({self.num_classes} classes, {self.num_queries} queries: {names})"


def _strip(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"synonyms must be str, got {type(name).__name__} ({name!r})")
    return name.strip()


def _split_synonyms(entry: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in entry.split(","))
