"""Evaluation: metrics (classification.py, latent.py), plots.py, and the evaluate stage (evaluate.py)."""
