"""Evaluation: metrics, plots and the evaluate stage."""
