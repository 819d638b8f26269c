"""On-disk formats, Ray-free, imported by every stage: crop shards and their manifest (`shards`), label and
batch vocabularies (`categories`), what a model expects as input (`spec`), checkpoints (`checkpoint`) and
prediction shards (`predictions`).

The layers then read one way: formats -> data (synthetic data, splits, Ray Data pipelines) -> train
(loop, Ray Train) -> infer (predictor, batch inference) -> eval (metrics) -> pipeline / CLI.
"""
