"""bench/bench_gpu.py on a CPU, as the GPU machine runs it: without Ray, optuna or scikit-learn.

The script runs in a subprocess with those packages made unimportable (a package of the same name
earlier on PYTHONPATH that raises ImportError), so a raycell import that needs them fails here as it
would on the GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench  # the bench/ scripts, not the product: `make test-bench`

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "bench_gpu.py"
ABSENT = ("ray", "optuna", "sklearn", "matplotlib", "tifffile")  # not installed on the GPU machine
QUICK = ["--quick", "--device", "cpu", "--cells", "512", "--steps", "2"]


def _run(
    tmp_path: Path, *args: str, timeout: int = 300
) -> tuple[subprocess.CompletedProcess, dict]:
    block = tmp_path / "absent"
    for name in ABSENT:
        (block / name).mkdir(parents=True, exist_ok=True)
        (block / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not installed on the GPU machine')\n"
        )
    out = tmp_path / "gpu.json"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(block), str(REPO)]), PYTHONUNBUFFERED="1"
    )
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(out)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_quick_cpu_run_has_every_section(tmp_path):
    # fp32 and bf16_cl: on a CPU bf16 is fp32 (raycell autocasts on CUDA only); resnet18 stands in
    # for resnet50 (the same timm code path), which the compile child still builds
    proc, res = _run(
        tmp_path,
        *QUICK,
        "--models",
        "conventional,mixedeffects,resnet18",
        "--precisions",
        "fp32,bf16_cl",
        "--compile-timeout-s",
        "3",
    )
    assert res["errors"] == [] and res["skipped"] == [], (res["errors"], res["skipped"])
    assert set(res["sections"]) == {"env", "data", "h2d", "models", "compile"}
    assert set(res["section_seconds"]) == set(res["sections"])
    env = res["sections"]["env"]
    assert env["raycell_models_imports_ray"] is False and res["ray_imported"] is False

    data = res["sections"]["data"]
    assert data["dataset"]["cells"] == 512 and data["dataset"]["unique_cells"] == 256
    assert data["in_process"]["images_per_s"] > 0
    one = data["procs"][0]
    assert one["procs"] == 1 and one["status"] == "ok" and one["images_per_s"] > 0
    assert one["images"] >= 512  # every shard read at least once

    assert res["sections"]["h2d"] and all(
        r["status"] == "ok" and r["images_per_s"] > 0 for r in res["sections"]["h2d"]
    )

    rows = res["sections"]["models"]
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 and r["step_ms"] > 0 for r in rows)
    got = {(r["model"], r["batch"], r["precision"], r["mode"]) for r in rows}
    assert ("mixedeffects", 2, "bf16_cl", "train_nosync") in got
    assert ("conventional", 4, "fp32", "infer") in got  # the 512 case, / 128
    assert ("resnet18", 2, "bf16_cl", "train") in got
    assert len(rows) == 2 * 5 + 5 + 4  # AECs: 2 + 3 modes; resnet18: 2 + 2

    comp = res["sections"]["compile"]
    assert comp["status"] in ("timeout", "ok") and comp["wall_s"] > 0
    assert [r["model"] for r in res["summary"]["models"]].count("mixedeffects") == 5
    assert "== summary" in proc.stdout and "== models done in" in proc.stdout


def test_spent_budget_skips_and_says_so(tmp_path):
    proc, res = _run(
        tmp_path,
        *QUICK,
        "--budget-s",
        "0",
        "--models",
        "conventional",
        "--precisions",
        "fp32",
        timeout=120,
    )
    assert "env" in res["sections"]  # always measured
    # 2 batch sizes x (train, infer)
    assert [r["status"] for r in res["sections"]["models"]] == ["skipped"] * 4
    assert res["sections"]["compile"]["status"] == "skipped"
    assert len(res["skipped"]) >= 4 and "time budget" in res["skipped"][0]
    assert "SKIP" in proc.stdout


@pytest.mark.parametrize("bad", [["--precisions", "fp16"], ["--sections", "gpu"]])
def test_bad_arguments_are_one_line_errors(bad):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *bad], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "unknown" in proc.stderr.splitlines()[-1]
