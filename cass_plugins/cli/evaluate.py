"""``cass-eval``: evaluate presets on the benchmark datasets (see :mod:`cass_plugins.evaluation.runner`)."""
from cass_plugins.evaluation.runner import main

__all__ = ["main"]
