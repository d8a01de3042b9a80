"""Baseline adapters: each baseline's last block as a plugin (baselines.md §1).

Importing this package registers the built-in baselines in :data:`cass_plugins.plugins.REGISTRY`.
"""
from cass_plugins.plugins import REGISTRY

from .base import Baseline
from .naclip import NACLIP

BASELINES = {cls.name: cls for cls in (NACLIP,)}
for _name, _cls in BASELINES.items():
    REGISTRY.add_baseline(_name, _cls)

__all__ = ["Baseline", "NACLIP", "BASELINES"]
