"""Command-line tools: ``cass-segment`` (:mod:`.segment`), ``cass-eval`` and ``cass-ablate``."""
