"""Legend fonts (coverage, scale) and label maps beyond 255 classes, checked by reading the files back."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from cass_plugins.pipeline.visualize import _font_for, legend_font_size, legend_overlay, missing_glyphs, save_label_map


def test_label_map_over_255_classes_is_16_bit(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 300, size=(23, 31))
    labels[0, 0] = 299
    save_label_map(tmp_path / "l.png", labels)
    back = Image.open(tmp_path / "l.png")
    assert back.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(back).astype(np.int64), labels)


def test_label_map_up_to_255_is_a_palette_png(tmp_path):
    labels = np.arange(256).reshape(16, 16)
    save_label_map(tmp_path / "l.png", labels)
    back = Image.open(tmp_path / "l.png")
    assert back.mode == "P"
    np.testing.assert_array_equal(np.asarray(back), labels)


def test_label_map_rejects_what_png_cannot_hold(tmp_path):
    with pytest.raises(ValueError):
        save_label_map(tmp_path / "l.png", np.full((2, 2), 70000))


def test_dejavu_covers_latin_greek_cyrillic_not_cjk():
    assert missing_glyphs("sofá Ελλάδα кошка") == ""
    assert missing_glyphs("猫 sofá") == "猫"


def test_missing_glyph_warning_names_the_class(caplog, monkeypatch):
    import cass_plugins.pipeline.visualize as vis

    monkeypatch.setattr(vis, "_system_fonts", lambda: ())  # as on a machine without CJK fonts
    labels = np.repeat(np.arange(3), 20).reshape(6, 10)
    with caplog.at_level(logging.WARNING, logger="cass_plugins.pipeline.visualize"):
        img = legend_overlay(np.zeros((6, 10, 3), np.uint8), labels, ["sofá", "猫", "dog"])
    assert "'猫'" in caplog.text and "sofá" not in caplog.text
    assert img.width > 10


def test_legend_text_scales_with_the_image():
    assert legend_font_size(400, 600) == 12
    assert legend_font_size(4000, 6000) >= 80  # readable on a 6000×4000 photo
    small = legend_overlay(np.zeros((40, 60, 3), np.uint8), np.zeros((40, 60), int), ["sofa"])
    big = legend_overlay(np.zeros((4000, 6000, 3), np.uint8), np.zeros((4000, 6000), int), ["sofa"])
    # the legend panel holds the same text, so its width grows with the font size
    assert (big.width - 6000) > 5 * (small.width - 60)
    # and the text really is drawn that large: dark pixels span about the font size vertically
    panel = np.asarray(big.convert("L"))[:, 6000:]
    rows = np.nonzero((panel < 60).any(axis=1))[0]
    assert rows.max() - rows.min() >= 0.6 * legend_font_size(4000, 6000)


def test_installed_cjk_font_is_used_when_present():
    path = _font_for("猫")
    if path is None:
        pytest.skip("no CJK font installed on this machine")
    assert missing_glyphs("猫", path) == ""
