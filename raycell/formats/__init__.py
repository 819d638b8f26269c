"""On-disk formats, Ray-free, imported by every stage: crop shards (`shards`) and their manifest
(`manifest`), label and batch vocabularies (`categories`), what a model expects as input (`spec`),
checkpoints and their meta (`checkpoint`) and prediction shards (`predictions`).

The layers then read one way: formats -> data (synthetic data, splits, Ray Data pipelines) -> train
(loop, Ray Train) -> infer (predictor, batch inference) -> eval (metrics) -> pipeline / CLI.
"""
