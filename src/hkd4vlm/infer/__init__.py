"""Inference: scoring records with a model, exporting predictions."""
