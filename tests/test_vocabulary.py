"""Vocabulary parsing and the packaged class files (protocol.md §3-4, baselines.md §3)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from cass_plugins.pipeline.vocabulary import BUILTIN_VOCABULARIES, Vocabulary

CLASSES_DIR = Path(__file__).resolve().parents[1] / "cass_plugins" / "data" / "classes"

# protocol.md §4: line counts, query counts and md5 prefixes of the authors' files.
FILES = {
    "voc21": (21, 56, "66096d7b"),
    "voc20": (20, 30, "c0a263bf"),
    "context60": (60, 60, "478af0e4"),
    "context59": (59, 59, "de9023e2"),
    "coco_object": (81, 113, "4eb52259"),
    "coco_stuff164k": (171, 171, "2d025c42"),
    "cityscapes": (19, 19, "a8bbbb99"),
    "ade20k": (150, 150, "e66c13f6"),
}
BACKGROUND_26 = ("sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed",
                 "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair",
                 "floor", "hill", "rail", "fence")
PERSON = ("person", "person in shirt", "person in jeans", "person in dress", "person in sweater", "person in skirt",
          "person in jacket")
TV = ("television monitor", "tv monitor", "monitor", "television", "screen")


# ---------------------------------------------------------------------------------------------- class files
@pytest.mark.parametrize("name", list(FILES))
def test_class_file_bytes(name: str) -> None:
    lines, _, md5 = FILES[name]
    data = (CLASSES_DIR / f"{name}.txt").read_bytes()
    assert hashlib.md5(data).hexdigest().startswith(md5)
    assert b"\r" not in data and not data.endswith(b"\n")
    assert data.count(b"\n") + 1 == lines


@pytest.mark.parametrize("name", list(FILES))
def test_builtin_counts(name: str) -> None:
    lines, queries, _ = FILES[name]
    vocab = Vocabulary.builtin(name)
    assert vocab.num_classes == lines and len(vocab.class_names) == lines
    assert vocab.num_queries == queries == len(vocab.queries) == len(vocab.query_to_class)


def test_builtin_contents() -> None:
    voc21 = Vocabulary.builtin("voc21")
    assert voc21.classes[0] == BACKGROUND_26
    assert voc21.classes[15] == PERSON and voc21.classes[20] == TV
    assert voc21.class_names[1] == "aeroplane"
    assert voc21.query_to_class[:27] == (0,) * 26 + (1,)
    assert Vocabulary.builtin("voc20").classes[14] == PERSON
    coco = Vocabulary.builtin("coco_object")
    assert coco.classes[0] == BACKGROUND_26 and coco.classes[1] == PERSON + ("body",)
    # 'bed' is both a background word and class 60 in the authors' file: kept, as they do.
    assert coco.classes[60] == ("bed",) and "bed" in coco.classes[0]
    context60 = Vocabulary.builtin("context60")
    assert context60.classes[0] == ("background",)
    assert context60.classes[-1] == ("wood ",)  # the trailing space survives the read
    assert Vocabulary.builtin("context59").classes[-1] == ("wood",)
    assert Vocabulary.builtin("coco_stuff") == Vocabulary.builtin("coco_stuff164k")
    assert Vocabulary.builtin("city_scapes").class_names[6] == "trafficlight"


def test_builtin_other_methods() -> None:
    for method in ("sclip", "naclip"):
        for name in BUILTIN_VOCABULARIES:
            assert Vocabulary.builtin(name, method) == Vocabulary.builtin(name)
    proxy = Vocabulary.builtin("voc21", method="proxyclip")
    assert proxy.classes[0] == BACKGROUND_26
    assert proxy.classes[15] == ("person",) and proxy.classes[20] == ("tvmonitor",)
    assert proxy.classes[1:15] == Vocabulary.builtin("voc21").classes[1:15]
    assert proxy.num_queries == 26 + 20
    proxy20 = Vocabulary.builtin("voc20", method="proxyclip")
    assert proxy20.num_queries == 20 and proxy20.classes[14] == ("person",) and proxy20.classes[19] == ("tvmonitor",)
    proxy_coco = Vocabulary.builtin("coco_object", method="proxyclip")
    assert proxy_coco.classes[0] == BACKGROUND_26[:14] + ("floor", "hill", "rail")
    assert proxy_coco.classes[1] == ("person",)
    assert proxy_coco.classes[2:] == Vocabulary.builtin("coco_object").classes[2:]
    for name in ("context60", "context59", "coco_stuff164k", "cityscapes", "ade20k"):
        assert Vocabulary.builtin(name, "proxyclip") == Vocabulary.builtin(name)
        assert Vocabulary.builtin(name, "clearclip") == Vocabulary.builtin(name)
    with pytest.raises(ValueError, match="not specified|does not give"):
        Vocabulary.builtin("voc21", method="clearclip")
    with pytest.raises(ValueError, match="unknown method"):
        Vocabulary.builtin("voc21", method="maskclip")
    with pytest.raises(ValueError, match="unknown built-in vocabulary.*from_file"):
        Vocabulary.builtin("pascal")


# ---------------------------------------------------------------------------------------------- parsing
def test_parse_forms() -> None:
    expected = (("cat",), ("dog", "puppy"), ("sky",))
    assert Vocabulary.parse("cat; dog, puppy; sky").classes == expected
    assert Vocabulary.parse("cat;dog,puppy;sky;").classes == expected  # trailing ';' ignored
    assert Vocabulary.parse("cat\ndog, puppy\nsky").classes == expected
    assert Vocabulary.parse(["cat", "dog, puppy", "sky"]).classes == expected
    assert Vocabulary.parse(["cat", ["dog", " puppy"], ("sky",)]).classes == expected
    assert Vocabulary.parse("cat, kitten").classes == (("cat", "kitten"),)  # one class, two synonyms
    v = Vocabulary.parse("cat; dog, puppy; sky")
    assert Vocabulary.parse(v) is v
    assert v.class_names == ("cat", "dog", "sky")
    assert v.queries == ("cat", "dog", "puppy", "sky")
    assert v.query_to_class == (0, 1, 1, 2)
    assert torch.equal(v.query_to_class_tensor(), torch.tensor([0, 1, 1, 2]))
    assert v.query_to_class_tensor().dtype == torch.long
    assert (v.num_classes, v.num_queries) == (3, 4)
    assert Vocabulary([["cat"], "dog"]).classes == (("cat",), ("dog",))  # lists are tuple-ified
    assert hash(v) == hash(Vocabulary.parse(["cat", ["dog", "puppy"], "sky"]))


def test_parse_path(tmp_path: Path) -> None:
    path = tmp_path / "v.txt"
    path.write_text("cat\ndog, puppy")
    assert Vocabulary.parse(path).classes == (("cat",), ("dog", "puppy"))


@pytest.mark.parametrize("spec, match", [
    ([], "empty vocabulary"),
    ("", "empty class name"),
    ("cat; ; dog", "empty class name"),
    ("cat, , kitten; dog", "empty class name"),
    (["cat", ""], "empty class name"),
    (["cat", []], "no names"),
    ("cat; dog, cat", "duplicate class name 'cat' in classes 0 and 1"),
    ("cat, cat; dog", "duplicate class name 'cat' in the same class"),
    ("Cat; cat", "duplicate class name"),
    ("red  car; red car", "duplicate class name"),
])
def test_parse_errors(spec: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Vocabulary.parse(spec)


def test_error_messages_suggest_a_fix() -> None:
    with pytest.raises(ValueError, match="remove"):
        Vocabulary.parse("cat; dog, cat")
    with pytest.raises(ValueError, match="e.g."):
        Vocabulary.parse([])
    assert Vocabulary((("cat",), ("dog", "cat")), allow_duplicates=True).num_queries == 3
    with pytest.raises(TypeError):
        Vocabulary.parse(42)
    with pytest.raises(TypeError):
        Vocabulary("cat")


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_bytes(b"sky, wall\ncat,kitten\nwood ")
    v = Vocabulary.from_file(path)
    # Authors' split on ", "; the bare comma is accepted with spaces stripped; the trailing space is kept.
    assert v.classes == (("sky", "wall"), ("cat", "kitten"), ("wood ",))
    assert Vocabulary.from_file(path, sep=",").classes == (("sky", "wall"), ("cat", "kitten"), ("wood",))
    path.write_bytes(b"a; b\nc\n")  # a final newline is not a class
    assert Vocabulary.from_file(path, sep="; ").classes == (("a", "b"), ("c",))
    path.write_bytes(b"a, b\r\nc\r\n")  # CRLF files read like LF files
    assert Vocabulary.from_file(path).classes == (("a", "b"), ("c",))
    path.write_bytes(b"a\n\nc")
    with pytest.raises(ValueError, match=r"classes\.txt.*empty class name"):
        Vocabulary.from_file(path)
    path.write_bytes(b"a\nb, a")
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary.from_file(path)
    assert Vocabulary.from_file(path, allow_duplicates=True).query_to_class == (0, 1, 1)
    # The packaged file read through from_file equals builtin().
    assert Vocabulary.from_file(CLASSES_DIR / "voc21.txt") == Vocabulary.builtin("voc21")


def test_describe() -> None:
    v = Vocabulary.parse("cat; dog, puppy, hound; sky")
    text = v.describe()
    assert text.splitlines() == ["Vocabulary: 3 classes, 5 queries", "  0: cat", "  1: dog, puppy, hound", "  2: sky"]
    assert "(+2 more)" in v.describe(max_synonyms=1)
    assert str(v) == "Vocabulary(3 classes, 5 queries: cat, dog, sky)"
    assert "'wood '" in Vocabulary.builtin("context60").describe()  # trailing whitespace made visible
