"""Datasets for fusion models: the synthetic shapes world (`fusion.data.shapes_world`)."""
