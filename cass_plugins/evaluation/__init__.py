"""Benchmark evaluation: dataset readers, the mmseg-style IoU metric, the evaluation runner and the ablation rows."""
