"""Video: streamed decoding, per-frame segmentation with temporal-consistency components, overlay export."""
