"""`raycell report`: one self-contained HTML page and its PNGs for a folder (`build_report`).

Run, demo, experiment, tune search and embeddings folders are recognised by the files raycell writes
there. Heavy imports (matplotlib, torch) happen inside the functions, so importing this is cheap.
"""

from raycell.report.build import ReportError, build_report, detect

__all__ = ["ReportError", "build_report", "detect"]
