"""The bad-input promise of docs/bad_inputs.md: every case that needs no Ray still gives exit 2, one line, and
keeps the user's files (the same cases and checks as the generator, `docs/bad_inputs.py --no-ray --check`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("bad_inputs", DOC / "bad_inputs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


GEN = _generator()


@pytest.mark.parametrize(
    "case", [c for c in GEN.CASES if not c.ray], ids=lambda c: f"{c.area}: {c.what}"
)
def test_bad_input_is_one_line_exit_2_and_keeps_data(case, tmp_path):
    fx = GEN.Fixtures(tmp_path)
    r = GEN.run_case(case, fx)
    assert not r["ray"], f"Ray was started before the error: {r}"
    assert GEN.verdict(case, r) == "", r


def test_the_table_lists_every_case():
    text = (DOC / "bad_inputs.md").read_text()
    missing = [c.what for c in GEN.CASES if f"| {c.what} |" not in text]
    assert not missing, f"docs/bad_inputs.md is stale (run docs/bad_inputs.py): {missing}"
