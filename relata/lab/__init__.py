"""Offline work: evaluation (next-item and basket), training, the benchmark and its seed
baseline."""
