"""Evaluation metrics for xraycap (each sub-folder is a self-contained `evaluate` module)."""
