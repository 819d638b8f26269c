"""cluster.yaml validates against the schema shipped in the Ray wheel (offline; no cloud calls)."""

import json
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _schema():
    import ray.autoscaler

    return json.load(open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")))


def test_cluster_yaml_is_valid():
    jsonschema = pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    errors = [e.message for e in jsonschema.Draft7Validator(_schema()).iter_errors(cfg)]
    assert not errors, errors
    validate_config(prepare_config(cfg))
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert any("raycell" in c for c in cfg["setup_commands"])


def test_schema_catches_a_typo():
    jsonschema = pytest.importorskip("jsonschema")
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg["max_worker"] = cfg.pop("max_workers")
    assert list(jsonschema.Draft7Validator(_schema()).iter_errors(cfg))
