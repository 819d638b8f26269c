"""Batch inference: a Ray Data actor that holds the model, and the job that writes prediction shards."""
