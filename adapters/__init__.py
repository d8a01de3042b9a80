"""Built-in baselines and CDAM as plugins (installed as ``cass_plugins.adapters``; docs/baselines.md, docs/cdam.md).

One module per method, each with its settings class and presets beside it, registered through its own
``cass_register`` hook when the registry loads (:data:`cass_plugins.core.registry.BUILTIN_PLUGINS`); importing
this package registers nothing. Baselines: ``naclip``, ``sclip``, ``clearclip``, ``vanilla``, ``maskclip``,
``proxyclip``; component: ``cdam``.
"""
from .clearclip import ClearCLIP, ClearCLIPSettings
from .naclip import NACLIP, NACLIPSettings
from .proxyclip import ProxyCLIP, ProxyCLIPSettings, proxy_graph
from .sclip import SCLIP, SCLIPSettings
from .vanilla import MaskCLIP, MaskCLIPSettings, Vanilla, VanillaSettings

BASELINES = {cls.name: cls for cls in (NACLIP, SCLIP, ClearCLIP, ProxyCLIP, Vanilla, MaskCLIP)}

__all__ = [
    "NACLIP", "SCLIP", "ClearCLIP", "ProxyCLIP", "Vanilla", "MaskCLIP", "NACLIPSettings", "SCLIPSettings",
    "ClearCLIPSettings", "ProxyCLIPSettings", "VanillaSettings", "MaskCLIPSettings", "proxy_graph", "BASELINES",
]
