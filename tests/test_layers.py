"""The package's layers: shared layers below, stages side by side, orchestration on top.

Every import (module level or inside a function) of a raycell module is checked against the ranks
below: a module imports only from its own package or from lower ranks, so no stage reaches into
another stage and nothing climbs back up. README's "Layout" section draws the same picture.
"""

import ast
from pathlib import Path

import raycell

ROOT = Path(raycell.__file__).parent

# rank: which top-level modules / packages of raycell live there
LAYERS = [
    {"constants", "errors"},
    {"utils"},
    {"config"},
    {"formats"},
    {"forward"},  # ModelOutput / LossOutput: read by losses, plans, models, the loop, inference
    {"features", "metrics", "plots", "losses", "data"},
    {"plans"},
    {"models"},
    {"ingest", "train", "infer", "eval", "profiling"},  # the stages, side by side
    {
        "tune",
        "zpredictor",
        "report",
    },  # built on stages: a search of trainings, train + infer, views
    {"pipeline"},  # the stages as functions of one config
    {"experiments"},  # many pipelines
    {"cli", "cluster_config"},  # the parser; the offline cluster-config checker
    {"__main__", "__init__"},  # the command table on top
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "raycell":
                yield from ("raycell." + a.name for a in node.names)
            elif node.module.startswith("raycell."):
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("raycell."))


def test_every_module_has_a_layer():
    units = {p.stem for p in ROOT.glob("*.py")}
    units |= {p.parent.name for p in ROOT.glob("*/__init__.py")}  # packages, not data folders
    assert units <= set(RANK), f"place these in LAYERS: {sorted(units - set(RANK))}"


def test_imports_flow_down_and_stages_stay_side_by_side():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent)
        src = _unit(".".join(rel.with_suffix("").parts))
        for target in _imports(path):
            dst = _unit(target)
            if dst == src:
                continue
            if RANK[dst] >= RANK[src]:
                bad.append(f"{rel}: {src} (layer {RANK[src]}) imports {target} (layer {RANK[dst]})")
    assert not bad, "imports that climb or cross stages:\n" + "\n".join(bad)
