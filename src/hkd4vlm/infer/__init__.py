"""Inference: scoring records with a model (one pass or mapping shifts), exporting predictions, and the
Detector, the Python API behind ``from hkd4vlm import Detector``."""
