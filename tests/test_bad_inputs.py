"""The bad-input promise of docs/bad_inputs.md: every case that needs no Ray still gives exit 2, one line,
keeps the user's files, starts no Ray, and is listed in the table.

The generator runs as a command (`docs/bad_inputs.py --no-ray --check`, as a maintainer would run it), so the
suite does not import the docs tooling; its output names each broken case.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_case_without_ray_keeps_its_promise_and_is_in_the_table():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "bad_inputs.py"), "--no-ray", "--check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, (
        "\n".join(ln for ln in out.splitlines() if ln.startswith("BAD") or "Traceback" in ln)
        or out[-3000:]
    )
    assert out.count("\nok ") + out.startswith("ok ") >= 20, out[-3000:]  # the cases ran
