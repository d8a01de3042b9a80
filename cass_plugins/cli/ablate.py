"""``cass-ablate``: the ablation rows on images or a dataset (see :mod:`cass_plugins.evaluation.ablation`)."""
from cass_plugins.evaluation.ablation import main

__all__ = ["main"]
