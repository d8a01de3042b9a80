"""The framework: hook specifications, the registry, settings and configuration, the last-block hook, the VFM
runner, the baseline base class and ``patch_clip``. Nothing here knows a particular method; the methods (CASS in
:mod:`cass_plugins.cass`, the baselines and CDAM in :mod:`cass_plugins.adapters`) register themselves through
``cass_register``."""
