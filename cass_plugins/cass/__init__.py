"""CASS (Kim et al., CVPR 2025): its pure tensor math (:mod:`.spectral`, :mod:`.matching`) and its three components
(:mod:`.distillation`, :mod:`.prior`, :mod:`.ota`), registered by :mod:`.plugin`."""
