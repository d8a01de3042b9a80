"""Trident (ICCV 2025, "splice-then-segment"): ProxyCLIP sub-images spliced before the head, aggregated with SAM's
last-block affinity, optionally refined with SAM prompts (docs/spec/trident.md)."""
