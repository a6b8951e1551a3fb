"""Evaluation for fusion models: answer accuracy, BLEU-4 and CIDEr-D (`fusion.evaluation.metrics`)."""
