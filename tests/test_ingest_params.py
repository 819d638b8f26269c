"""The ingest parameters: built from the config section in one place, recorded as before."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from raycell.config import IngestConfig, load_config
from raycell.ingest.params import PATH_KEYS, IngestParams

RECORD = Path(__file__).parent / "data" / "ingest_params_record.json"


def test_from_config_makes_paths_absolute_and_copies_the_section(tmp_path, monkeypatch):
    """Ray workers do not share the driver's working directory: every set path becomes absolute."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(
        None,
        [
            "ingest.input=images",
            "ingest.out=~/crops",
            "ingest.masks=../masks",
            "ingest.channels=[DNA, actin]",
            "ingest.pattern=(?P<well>[A-P]\\d+)_(?P<channel>\\w+)\\.tif",
        ],
    )
    p = IngestParams.from_config(cfg.ingest)
    assert p.input == str(tmp_path / "images")
    assert p.out == str(tmp_path / "home" / "crops")
    assert p.masks == str(tmp_path.parent / "masks")
    assert p.platemap == "" and p.objects == ""  # unset paths stay unset
    assert p.pattern == cfg.ingest.pattern  # not a path: as given
    # every path key is a field of the section (a renamed field would be left relative silently)
    assert set(PATH_KEYS) <= {f.name for f in dataclasses.fields(IngestConfig)}
    p.channels.append("extra")  # the tasks' copy never aliases the config's lists
    assert cfg.ingest.channels == ["DNA", "actin"]


def test_defaults_are_the_config_sections():
    """Built directly, the parameters are the config's defaults (declared once, in config.py)."""
    assert dataclasses.asdict(IngestParams()) == dataclasses.asdict(IngestConfig())
    assert IngestParams(crop_size=32).crop_size == 32


def test_record_is_the_one_data_sets_already_carry():
    """A data set's manifest records its parameters; a re-run with the same ones is skipped.

    The fixture is the record an ingest wrote before the parameters were typed: equal records are
    what lets an existing data set be recognised rather than refused (ingest.overwrite).
    """
    fixture = json.loads(RECORD.read_text())
    p = IngestParams.from_config(load_config(None, fixture["sets"]).ingest)
    rec = p.record()
    assert rec == fixture["record"]
    assert "out" not in rec and "overwrite" not in rec  # where to write: not what the crops are
    assert json.loads(json.dumps(rec)) == rec
