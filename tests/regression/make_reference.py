"""Store the outputs of every preset on tiny seeded models (the refactor regression reference).

Run from the repository root: ``python tests/regression/make_reference.py``. It writes
``tests/regression/reference_outputs.pt``: for each preset, the patched dense features of two crops and the
``Segmenter`` logits of one small image. ``tests/regression/test_presets_regression.py`` recomputes them and
compares; regenerate only when a change of the numbers is intended (and say so in the commit).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from regression_cases import compute_outputs, preset_names  # noqa: E402


def main() -> None:
    outputs = {name: compute_outputs(name) for name in preset_names()}
    path = HERE / "reference_outputs.pt"
    torch.save(outputs, path)
    print(f"wrote {len(outputs)} presets to {path}")


if __name__ == "__main__":
    main()
