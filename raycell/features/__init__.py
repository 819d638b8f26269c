"""Hand-made cell features, below the stages: ingest stores them, evaluation and profiling use them."""
