"""The evaluate stage (evaluate.py) and the hand-made-feature baseline (baseline.py); the metrics they
report live in raycell.metrics, the figures in raycell.plots.
"""
