"""Distillation: losses, teachers, stages, recipes."""
