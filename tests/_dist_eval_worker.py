"""``cass-eval`` under torchrun with the tiny random test models (run by tests/test_eval.py, not collected).

Usage: ``torchrun --standalone --nproc_per_node N tests/_dist_eval_worker.py <cass-eval arguments>``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest's model builders

from conftest import make_tiny_clip, make_tiny_vfm  # noqa: E402

from cass_plugins.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    # One thread per process, as in the single-process reference run: float reductions then happen in the same
    # order, so predictions are bit-identical whichever process scores an image.
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1:], models=(make_tiny_clip(), make_tiny_vfm())))
