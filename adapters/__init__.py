"""Baseline adapters: each baseline's last block as a plugin (baselines.md §1).

Importing this package registers the built-in baselines in :data:`cass_plugins.plugins.REGISTRY` and each
baseline's own protocol defaults as presets (``sclip``, ``naclip``, ``clearclip``, ``clearclip-shipped``,
``proxyclip``, ``vanilla``, ``maskclip``, ``maskclip-original``), with per-dataset values (baselines.md §3) and the
CASS components switched off.
"""
from cass_plugins.plugins import REGISTRY
from cass_plugins.presets import register_preset

from . import clearclip, naclip, proxyclip, sclip, vanilla
from .base import STRATEGIES, Baseline
from .clearclip import ClearCLIP
from .naclip import NACLIP
from .proxyclip import ProxyCLIP, proxy_graph
from .sclip import SCLIP
from .vanilla import MaskCLIP, Vanilla

BASELINES: dict[str, type[Baseline]] = {
    cls.name: cls for cls in (NACLIP, SCLIP, ClearCLIP, ProxyCLIP, Vanilla, MaskCLIP)
}
for _name, _cls in BASELINES.items():
    REGISTRY.add_baseline(_name, _cls)

#: preset name -> (values, per-dataset values) of every baseline.
BASELINE_PRESETS = {}
for _module in (vanilla, sclip, naclip, clearclip, proxyclip):
    BASELINE_PRESETS.update(_module.PRESETS)
for _name, (_values, _datasets) in BASELINE_PRESETS.items():
    register_preset(_name, _values, _datasets)

__all__ = [
    "Baseline", "STRATEGIES", "NACLIP", "SCLIP", "ClearCLIP", "ProxyCLIP", "Vanilla", "MaskCLIP", "proxy_graph",
    "BASELINES", "BASELINE_PRESETS",
]
