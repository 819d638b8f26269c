"""Metrics shared by training, evaluation and profiling: classification (one AUROC) and batch mixing."""
