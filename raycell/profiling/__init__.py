"""Profiling of the embeddings `raycell embed` writes: profiles.py, export.py, figures.py.

profiles.py reads an embeddings folder, selects features, aggregates wells, runs PCA/UMAP and
scores the weak-label heads; export.py writes AnnData (.h5ad) or CytoTable-style tables;
figures.py draws the scatter and confusion plots. Nothing heavy is imported here.
"""
