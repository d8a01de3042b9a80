"""The single-image pipeline: image loading and resizing, sliding windows, text embeddings and vocabularies, the
``Segmenter``, post-processing, PAMR and visualisation."""
