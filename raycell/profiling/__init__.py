"""Profiling of the embeddings `raycell embed` writes: profiles.py, export.py, figures.py.

profiles.py reads an embeddings folder, selects features, aggregates wells, runs PCA/UMAP and
scores the weak-label heads; export.py writes AnnData (.h5ad) or CytoTable-style tables;
figures.py draws the scatter and confusion plots. `raycell profile`: profile_folder.py (the verb and
its output folder) over wellprofiles.py (aggregate, per-plate control normalisation, selection,
sphering: pycytominer), retrieval.py (mAP metrics: copairs), correction.py (Harmony, corrections
compared) and handmade.py (hand-made and cp-measure features of a crop data set). Nothing heavy is
imported here.
"""
