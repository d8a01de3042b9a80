"""Every preset gives the numbers it gave before the component-model refactor (stored outputs, open_clip style)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from regression_cases import compute_outputs, preset_names

REFERENCE = Path(__file__).resolve().parent / "reference_outputs.pt"


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(REFERENCE, weights_only=True)


@pytest.mark.parametrize("preset", preset_names())
def test_preset_outputs_unchanged(preset: str, reference) -> None:
    expected = reference[preset]
    got = compute_outputs(preset)
    torch.testing.assert_close(got["features"], expected["features"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["logits"], expected["logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(got["labels"], expected["labels"])
