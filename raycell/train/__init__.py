"""Training: plans (how a model is optimised), the per-worker loop, checkpoints and the Ray trainer."""
