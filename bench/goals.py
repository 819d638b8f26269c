"""The speed goals, and how each is read from the benchmarks' JSON.

Kept apart from `run_all.py` so the table logic is checked without running anything
(tests/test_bench_smoke.py).
A goal whose benchmark did not run, or did not produce its figure, is "not measured", never met.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable


def dig(d: dict | None, *keys):
    """d[k1][k2]...; None when any level is missing."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _ingest_best_ray(r: dict) -> float | None:
    """Lowest seconds per field per core of the Ray rows on the synthetic 2-channel fields."""
    vals = [
        x.get("s_per_fov_per_core")
        for x in (r or {}).get("rows", [])
        if x.get("mode", "").startswith("ray") and str(x.get("data", "")).startswith("synthetic")
    ]
    vals = [v for v in vals if isinstance(v, (int, float))]
    return min(vals) if vals else None


@dataclass(frozen=True)
class Goal:
    """One goal: its figure, the benchmark it comes from, how to read it, and the bound."""

    figure: str
    goal: str
    bench: str
    read: Callable[[dict], float | None]
    op: str  # ">=" or "<="
    target: float

    def check(self, results: dict) -> dict:
        """The goals-table row for this goal from {bench name: that bench's JSON}."""
        r = results.get(self.bench)
        value = self.read(r) if isinstance(r, dict) else None
        met = (
            None
            if value is None
            else {">=": operator.ge, "<=": operator.le}[self.op](value, self.target)
        )
        return {
            "figure": self.figure,
            "goal": self.goal,
            "measured": value,
            "met": met,
            "status": {True: "met", False: "missed", None: "not measured"}[met],
            "command": (r or {}).get("command") if isinstance(r, dict) else None,
        }


GOALS = [
    Goal(
        "Ray Data images/s per core vs pyarrow, steady state, 64 px",
        ">= 0.8x",
        "dataloader",
        lambda r: dig(r, "sizes", "64", "ratios", "ray_data", "per_core_x_pyarrow"),
        ">=",
        0.8,
    ),
    Goal(
        "Ray Data images/s per core vs pyarrow, steady state, 256 px",
        ">= 0.8x",
        "dataloader",
        lambda r: dig(r, "sizes", "256", "ratios", "ray_data", "per_core_x_pyarrow"),
        ">=",
        0.8,
    ),
    Goal(
        "Ray Data images/s vs PNG DataLoader, 64 px",
        ">= 8x",
        "dataloader",
        lambda r: dig(r, "sizes", "64", "ratios", "ray_data", "x_png"),
        ">=",
        8.0,
    ),
    Goal(
        "Ray Data images/s vs PNG DataLoader, 256 px",
        ">= 3x",
        "dataloader",
        lambda r: dig(r, "sizes", "256", "ratios", "ray_data", "x_png"),
        ">=",
        3.0,
    ),
    Goal(
        "Ray Train epoch time vs plain loop, 1 worker",
        "<= 1.15x",
        "train_infer",
        lambda r: dig(r, "train", "ray_train_1_worker", "x_plain_time"),
        "<=",
        1.15,
    ),
    Goal(
        "raycell infer images/s vs plain inference_mode loop, 1 actor",
        ">= 0.9x",
        "train_infer",
        lambda r: dig(r, "infer", "raycell_infer_1_actor", "x_plain"),
        ">=",
        0.9,
    ),
    Goal(
        "raycell infer 2-actor efficiency, t1 / (2 t2)",
        ">= 0.8",
        "train_infer",
        lambda r: dig(r, "infer", "raycell_infer_2_actor", "efficiency_vs_1"),
        ">=",
        0.8,
    ),
    Goal(
        "ingest seconds per 512x512 2-channel field per core (Ray, best of 1/2 workers)",
        "<= 0.25 s",
        "ingest",
        _ingest_best_ray,
        "<=",
        0.25,
    ),
]


def goals_table(results: dict) -> list[dict]:
    """Every goal checked against {bench name: JSON} (missing benches give 'not measured' rows)."""
    return [g.check(results) for g in GOALS]
