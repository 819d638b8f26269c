"""Data: the crop-shard format, category maps, splits, the synthetic generator and Ray Data pipelines."""
