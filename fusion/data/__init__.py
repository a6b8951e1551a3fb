"""Data: the synthetic shapes world, dataset files, batching."""
