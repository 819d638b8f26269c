"""cluster.yaml and k8s/rayjob.yaml are checked offline (no cloud, no Kubernetes, no Ray started).

The shipped files pass; each broken variant fails with one line that names the file and the key.
cluster.yaml: the JSON schema shipped in the Ray wheel + Ray's validate_config + raycell's pins and
bounds. RayJob: the vendored CRD field schema (unknown fields are errors) + raycell's expectations.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from raycell.cluster_config import (
    RAYJOB_SCHEMA,
    check_cluster_file,
    check_cluster_yaml,
    check_rayjob,
    ray_pin,
)
from raycell.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
RAYJOB = ROOT / "k8s" / "rayjob.yaml"
PIN = f"ray{ray_pin()}"  # e.g. ray==2.60.*, read from pyproject.toml like the checker does


def _error(check, path: Path) -> str:
    """The checker's message: one line that starts with the file."""
    with pytest.raises(ConfigError) as info:
        check(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{path}: "), msg
    return msg


def _variant(tmp_path: Path, source: Path, mutate) -> Path:
    doc = yaml.safe_load(source.read_text())
    mutate(doc)
    out = tmp_path / source.name
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


# ------------------------------------------------------------------------------------------------
# the shipped files


def test_shipped_cluster_yaml_passes():
    cfg = check_cluster_yaml(CLUSTER)
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert any("raycell" in c for c in cfg["setup_commands"])
    assert cfg["initialization_commands"]  # the shared file system
    assert check_cluster_file(CLUSTER)[0] == "cluster"


def test_shipped_rayjob_passes():
    job = check_rayjob(RAYJOB)
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m raycell train --config configs/")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    rcs = spec["rayClusterSpec"]
    assert rcs["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = rcs["workerGroupSpecs"][0]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    assert check_cluster_file(RAYJOB)[0] == "rayjob"


def test_the_crd_schema_is_package_data_read_through_importlib_resources():
    """The RayJob check reads its schema from the package, and pyproject.toml ships it in the wheel."""
    import fnmatch
    import tomllib
    from importlib import resources

    package = resources.files("raycell")
    assert RAYJOB_SCHEMA == package / "cluster_schemas" / "rayjob-crd-schema.yaml"
    assert RAYJOB_SCHEMA.is_file()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = declared["package-data"]["raycell"]
    assert any(fnmatch.fnmatch("cluster_schemas/rayjob-crd-schema.yaml", p) for p in patterns)


def test_check_cluster_works_from_an_installed_wheel(tmp_path):
    """Built as a wheel and installed elsewhere (no checkout around it), the CLI checks both files."""
    import shutil
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "raycell", src / "raycell", ignore=shutil.ignore_patterns("__pycache__"))
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "-w", str(tmp_path / "whl"), str(src)], check=True, timeout=600)
    (wheel,) = (tmp_path / "whl").glob("raycell-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel installs by unpacking
    shutil.rmtree(src)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import raycell; print(raycell.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(site))
    run = subprocess.run(
        [sys.executable, "-m", "raycell", "check-cluster", str(CLUSTER), str(RAYJOB)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count(": OK (") == 2, run.stdout


def test_vendored_crd_schema_names_its_source():
    header = RAYJOB_SCHEMA.read_text().split("openAPIV3Schema:")[0]
    assert "ray-operator/config/crd/bases/ray.io_rayjobs.yaml" in header
    assert "kuberay" in header and re.search(r"\b[0-9a-f]{40}\b", header)


# ------------------------------------------------------------------------------------------------
# cluster.yaml variants


def _node(name):
    return lambda c: c["available_node_types"][name]


CLUSTER_CASES = {
    "typo at the top level": (
        lambda c: c.__setitem__("max_worker", c.pop("max_workers")),
        ["unknown key 'max_worker'", "did you mean 'max_workers'?", "valid keys in '<top level>'"],
    ),
    "typo inside a node type": (
        lambda c: _node("gpu_worker")(c).__setitem__("max_worker", 8),
        ["unknown key 'available_node_types.gpu_worker.max_worker'", "did you mean 'max_workers'?"],
    ),
    "typo in docker": (
        lambda c: c["docker"].__setitem__("imag", c["docker"].pop("image")),
        ["unknown key 'docker.imag'", "did you mean 'image'?"],
    ),
    "wrong type": (
        lambda c: c.__setitem__("max_workers", "8"),
        ["max_workers must be an integer, got a string '8'"],
    ),
    "wrong type inside a node type": (
        lambda c: _node("gpu_worker")(c).__setitem__("min_workers", "zero"),
        ["available_node_types.gpu_worker.min_workers must be an integer"],
    ),
    "below the schema's minimum": (
        lambda c: c.__setitem__("max_workers", -1),
        ["max_workers must be >= 0, got -1"],
    ),
    "docker without a container name": (
        lambda c: c["docker"].pop("container_name"),
        ["missing required key 'docker.container_name'"],
    ),
    "unknown provider type": (
        lambda c: c["provider"].__setitem__("type", "aws2"),
        ["provider.type 'aws2' is not a node provider Ray knows", "aws, azure"],
    ),
    "missing required key": (
        lambda c: c.pop("cluster_name"),
        ["missing required key 'cluster_name'"],
    ),
    "image of another Ray version": (
        lambda c: c["docker"].__setitem__("image", "rayproject/ray:2.59.0-py311-gpu"),
        ["docker.image", "carries Ray 2.59.0", PIN],
    ),
    "unpinned image": (
        lambda c: c["docker"].__setitem__("image", "rayproject/ray:latest-gpu"),
        ["docker.image", "does not name a Ray version"],
    ),
    "setup pins another Ray": (
        lambda c: c["setup_commands"].append('pip install "ray[default]==2.59.0"'),
        ["setup_commands[1] installs ray==2.59.0", PIN],
    ),
    "setup does not install raycell": (
        lambda c: c.__setitem__("setup_commands", ["pip install -q timm"]),
        ["setup_commands: no setup command installs raycell"],
    ),
    "raycell path not synced": (
        lambda c: c.__setitem__("file_mounts", {}),
        ["setup_commands[0] installs /home/ubuntu/raycell", "file_mounts"],
    ),
    "head that takes work": (
        lambda c: _node("head")(c).__setitem__("resources", {"CPU": 8}),
        ["available_node_types.head.resources.CPU must be 0", "got 8"],
    ),
    "head type not among the node types": (
        lambda c: c.__setitem__("head_node_type", "main"),
        ["head_node_type 'main' is not one of available_node_types"],
    ),
    "min_workers above max_workers": (
        lambda c: _node("gpu_worker")(c).__setitem__("min_workers", 9),
        [
            "available_node_types.gpu_worker.min_workers (9) is larger than "
            "available_node_types.gpu_worker.max_workers (8)"
        ],
    ),
    "node max_workers above the cluster's": (
        lambda c: _node("gpu_worker")(c).__setitem__("max_workers", 16),
        ["available_node_types.gpu_worker.max_workers (16)", "cluster's max_workers (8)"],
    ),
    "no room for workers": (
        lambda c: _node("gpu_worker")(c).__setitem__("max_workers", 0),
        ["available_node_types.gpu_worker.max_workers", "nothing to train on"],
    ),
}


@pytest.mark.parametrize("case", list(CLUSTER_CASES))
def test_broken_cluster_yaml_is_one_line(tmp_path, case):
    mutate, expected = CLUSTER_CASES[case]
    msg = _error(check_cluster_yaml, _variant(tmp_path, CLUSTER, mutate))
    for text in expected:
        assert text in msg, msg


def test_what_ray_finds_is_one_line_too(tmp_path, monkeypatch):
    from raycell.utils import ray_private

    def validate_config(cfg):
        raise ValueError("The global `max_workers` is smaller\nthan the sum of min_workers")

    monkeypatch.setattr(ray_private, "validate_launcher_config", validate_config)
    msg = _error(check_cluster_yaml, CLUSTER)
    assert "Ray's validate_config: ValueError: The global `max_workers` is smaller than" in msg


# ------------------------------------------------------------------------------------------------
# RayJob variants


def _rcs(j):
    return j["spec"]["rayClusterSpec"]


def _gpu(j):
    return _rcs(j)["workerGroupSpecs"][0]


def _gpu_container(j):
    return _gpu(j)["template"]["spec"]["containers"][0]


W0 = "spec.rayClusterSpec.workerGroupSpecs[0]"
RAYJOB_CASES = {
    "missing entrypoint": (
        lambda j: j["spec"].pop("entrypoint"),
        ["missing required key 'spec.entrypoint'"],
    ),
    "missing headGroupSpec": (
        lambda j: _rcs(j).pop("headGroupSpec"),
        ["missing required key 'spec.rayClusterSpec.headGroupSpec'"],
    ),
    "missing rayClusterSpec": (
        lambda j: j["spec"].pop("rayClusterSpec"),
        ["missing required key 'spec.rayClusterSpec'", "clusterSelector"],
    ),
    "unknown field in workerGroupSpecs": (
        lambda j: _gpu(j).__setitem__("maxReplica", _gpu(j).pop("maxReplicas")),
        [f"unknown key '{W0}.maxReplica'", "did you mean 'maxReplicas'?"],
    ),
    "unknown field in spec": (
        lambda j: j["spec"].__setitem__(
            "shutdownAfterJobFinish", j["spec"].pop("shutdownAfterJobFinishes")
        ),
        ["unknown key 'spec.shutdownAfterJobFinish'", "did you mean 'shutdownAfterJobFinishes'?"],
    ),
    "unknown field in headGroupSpec": (
        lambda j: _rcs(j)["headGroupSpec"].__setitem__("rayStartParam", {}),
        [
            "unknown key 'spec.rayClusterSpec.headGroupSpec.rayStartParam'",
            "did you mean 'rayStartParams'?",
        ],
    ),
    "wrong type": (
        lambda j: _gpu(j).__setitem__("maxReplicas", "8"),
        [f"{W0}.maxReplicas must be an integer, got a string '8'"],
    ),
    "rayStartParams value that is not a string": (
        lambda j: _rcs(j)["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0),
        [
            "spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus must be a string, "
            "got an integer 0"
        ],
    ),
    "rayVersion read as a number": (
        lambda j: _rcs(j).__setitem__("rayVersion", 2.6),
        ["spec.rayClusterSpec.rayVersion must be a string, got a number 2.6"],
    ),
    "value outside an enum": (
        lambda j: _rcs(j)["autoscalerOptions"].__setitem__("upscalingMode", "Fast"),
        ["spec.rayClusterSpec.autoscalerOptions.upscalingMode must be one of 'Default'"],
    ),
    "int32 overflow": (
        lambda j: _gpu(j).__setitem__("maxReplicas", 2**31),
        [f"{W0}.maxReplicas must be a valid int32"],
    ),
    "rayVersion off the pin": (
        lambda j: _rcs(j).__setitem__("rayVersion", "2.59.0"),
        ["spec.rayClusterSpec.rayVersion '2.59.0' does not match", PIN],
    ),
    "worker image off the pin": (
        lambda j: _gpu_container(j).__setitem__("image", "rayproject/ray:2.59.0-py311-gpu"),
        [f"{W0}.template.spec.containers[0].image", "carries Ray 2.59.0", PIN],
    ),
    "head that takes work": (
        lambda j: _rcs(j)["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", "4"),
        ['spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus must be "0"', "got '4'"],
    ),
    "minReplicas above maxReplicas": (
        lambda j: _gpu(j).__setitem__("minReplicas", 9),
        [f"{W0}.minReplicas (9) is larger than {W0}.maxReplicas (8)"],
    ),
    "replicas outside the bounds": (
        lambda j: _gpu(j).__setitem__("replicas", 20),
        [f"{W0}.replicas (20) is outside [minReplicas, maxReplicas] = [0, 8]"],
    ),
    "unbounded worker group": (
        lambda j: _gpu(j).pop("maxReplicas"),
        [f"missing required key '{W0}.maxReplicas'", "unbounded"],
    ),
    "no worker group": (
        lambda j: _rcs(j).__setitem__("workerGroupSpecs", []),
        ["missing required key 'spec.rayClusterSpec.workerGroupSpecs'"],
    ),
    "TTL that never applies": (
        lambda j: j["spec"].__setitem__("shutdownAfterJobFinishes", False),
        ["spec.ttlSecondsAfterFinished is 600", "spec.shutdownAfterJobFinishes is not true"],
    ),
    "mount of a volume the pod lacks": (
        lambda j: _gpu_container(j)["volumeMounts"][0].__setitem__("name", "shard"),
        [
            f"{W0}.template.spec.containers[0].volumeMounts[0].name 'shard' is not one of the pod's "
            "volumes"
        ],
    ),
    "worker without the shared runs folder": (
        lambda j: _gpu_container(j)["volumeMounts"].pop(1),
        [f"{W0}.template.spec.containers[0].volumeMounts: shared storage differs", "/mnt/runs"],
    ),
    "runtimeEnvYAML that is not YAML": (
        lambda j: j["spec"].__setitem__("runtimeEnvYAML", "pip: [timm\n"),
        ["spec.runtimeEnvYAML: YAML syntax error at line"],
    ),
    "job script config that does not exist": (
        lambda j: j["spec"].__setitem__(
            "entrypoint", "python jobs/train.py --config=configs/nope.yaml"
        ),
        ["spec.entrypoint: --config configs/nope.yaml does not exist"],
    ),
    "entrypoint config that does not exist": (
        lambda j: j["spec"].__setitem__(
            "entrypoint",
            "python -m raycell train --config configs/gpu_clustr.yaml --data /mnt/data/x",
        ),
        ["spec.entrypoint: --config configs/gpu_clustr.yaml does not exist"],
    ),
    "old apiVersion": (
        lambda j: j.__setitem__("apiVersion", "ray.io/v1alpha1"),
        ["apiVersion must be 'ray.io/v1'", "'ray.io/v1alpha1'"],
    ),
    "not a RayJob": (
        lambda j: j.__setitem__("kind", "RayCluster"),
        ["kind must be 'RayJob', got 'RayCluster'"],
    ),
}


@pytest.mark.parametrize("case", list(RAYJOB_CASES))
def test_broken_rayjob_is_one_line(tmp_path, case):
    mutate, expected = RAYJOB_CASES[case]
    msg = _error(check_rayjob, _variant(tmp_path, RAYJOB, mutate))
    for text in expected:
        assert text in msg, msg


def test_rayjob_beside_other_documents(tmp_path):
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "shared"}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(claim) + "---\n" + RAYJOB.read_text())
    assert check_rayjob(path)["kind"] == "RayJob"
    assert check_cluster_file(path)[0] == "rayjob"
    path.write_text(yaml.safe_dump(claim) + "---\n" + yaml.safe_dump(claim))
    assert "0 RayJob documents among 2" in _error(check_rayjob, path)


# ------------------------------------------------------------------------------------------------
# files that are not YAML mappings at all (both checkers)


@pytest.mark.parametrize("check", [check_cluster_yaml, check_rayjob, check_cluster_file])
def test_yaml_syntax_error_names_line_and_column(tmp_path, check):
    path = tmp_path / "bad.yaml"
    path.write_text("cluster_name: raycell\nprovider: {type: aws\nmax_workers: 2\n")
    msg = _error(check, path)
    assert re.search(r"YAML syntax error at line \d+, column \d+", msg), msg


@pytest.mark.parametrize("check", [check_cluster_yaml, check_rayjob, check_cluster_file])
def test_missing_file(tmp_path, check):
    assert "file not found" in _error(check, tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "empty file"),
        ("- a\n- b\n", "got a list"),
        (
            "cluster_name: a\nmax_workers: 2\ncluster_name: b\n",
            "key 'cluster_name' given twice, at lines 1 and 3",
        ),
    ],
)
def test_not_a_mapping(tmp_path, text, expected):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    assert expected in _error(check_cluster_yaml, path)


def test_check_cluster_cli_passes_the_shipped_files_and_fails_a_typo_in_one_line(tmp_path, capsys):
    from raycell.__main__ import main

    assert (
        main(["check-cluster", str(ROOT / "cluster.yaml"), str(ROOT / "k8s" / "rayjob.yaml")]) == 0
    )
    assert capsys.readouterr().out.count(": OK (") == 2
    bad = tmp_path / "cluster.yaml"
    bad.write_text(
        (ROOT / "cluster.yaml").read_text().replace("max_workers: 8", "max_worker: 8", 1)
    )
    assert main(["check-cluster", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"raycell: error: {bad}: unknown key 'max_worker'") and "\n" not in err
