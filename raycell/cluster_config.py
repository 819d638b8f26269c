"""Offline checks of the cluster configs: the Ray launcher's `cluster.yaml` and a KubeRay `RayJob`.

Neither check talks to a cloud or a Kubernetes API server. `cluster.yaml` is checked against the
JSON schema shipped in the Ray wheel (`ray/autoscaler/ray-schema.json`), then by Ray's own
`prepare_config` + `validate_config` (defaults from local files, no cloud calls). A RayJob manifest
is checked against the RayJob CRD's field schema shipped with raycell as package data
(`raycell/cluster_schemas/rayjob-crd-schema.yaml`, read through importlib.resources so that an
installed wheel has it too), with unknown fields made errors: the API server drops them silently,
so a typo'd field would just vanish.
Then raycell's own expectations: the Ray version pinned in pyproject.toml in images and setup, a
head that runs no work, consistent autoscaling bounds, and (RayJob) one shared storage on every pod.

Every problem is a `ConfigError` of one line: the file, the key path (e.g.
`available_node_types.gpu_worker.max_workers`) and what is wrong.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import re
import shlex
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import yaml

from raycell.errors import ConfigError, UserError

# A checkout's root: its pyproject.toml holds the Ray pin, its configs/ the files an entrypoint
# names. From an installed wheel neither exists there, and the installed metadata is used instead.
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
# The vendored RayJob CRD schema: package data (pyproject.toml [tool.setuptools.package-data]).
RAYJOB_SCHEMA = resources.files("raycell") / "cluster_schemas" / "rayjob-crd-schema.yaml"
INT32_MAX = 2**31 - 1


# ------------------------------------------------------------------------------------------------
# public API


def check_cluster_file(path: str | Path) -> tuple[str, dict]:
    """Check a cluster config of either kind (a RayJob manifest says `kind: RayJob`).

    Returns:
        ("rayjob" or "cluster", the loaded config): what `raycell check-cluster FILE...` reports.
    """
    docs = _read_yaml(Path(path))
    if any(isinstance(d, dict) and d.get("kind") == "RayJob" for d in docs):
        return "rayjob", check_rayjob(path)
    return "cluster", check_cluster_yaml(path)


def check_cluster_yaml(path: str | Path) -> dict:
    """Check a Ray cluster-launcher config (`ray up FILE`) offline; returns it as loaded.

    Raises:
        ConfigError: one line naming the file, the key path and what is wrong.
    """
    path = Path(path)
    cfg = _one_mapping(path, _read_yaml(path))
    _schema_check(path, cfg, _launcher_schema())
    _check_launcher(_Fail(path), cfg)
    _ray_validate(path, cfg)
    return cfg


def check_rayjob(path: str | Path) -> dict:
    """Check a KubeRay RayJob manifest offline; returns the RayJob document as loaded.

    Raises:
        ConfigError: one line naming the file, the key path and what is wrong.
    """
    path = Path(path)
    docs = _read_yaml(path)
    if len(docs) > 1:  # a claim or a config map in the same file is fine; one RayJob
        jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "RayJob"]
        if len(jobs) != 1:
            kinds = ", ".join(str(d.get("kind")) if isinstance(d, dict) else _kind(d) for d in docs)
            raise ConfigError(
                f"{path}: {len(jobs)} RayJob documents among {len(docs)} "
                f"(kinds: {kinds}); give exactly one"
            )
        docs = jobs
    job = _one_mapping(path, docs)
    if job.get("apiVersion") != "ray.io/v1":
        raise ConfigError(
            f"{path}: apiVersion must be 'ray.io/v1' (KubeRay 1.0 or newer), got "
            f"{_short(job.get('apiVersion'))}"
        )
    if job.get("kind") != "RayJob":
        raise ConfigError(f"{path}: kind must be 'RayJob', got {_short(job.get('kind'))}")
    _schema_check(path, job, _rayjob_schema())
    _check_rayjob(_Fail(path), job)
    return job


def ray_pin() -> Any:
    """The Ray versions raycell pins, as a `packaging` SpecifierSet (e.g. `==2.60.*`).

    Read from pyproject.toml in a checkout, else from the installed raycell's metadata: the pin
    is written once.
    """
    from packaging.requirements import Requirement

    if _in_checkout():
        import tomllib

        source = str(PYPROJECT)
        try:
            reqs = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
        except (tomllib.TOMLDecodeError, KeyError) as exc:
            raise UserError(f"{PYPROJECT}: cannot read [project].dependencies ({exc})") from exc
    else:
        from importlib.metadata import PackageNotFoundError, requires

        source = "the installed raycell's metadata"
        try:
            reqs = requires("raycell") or []
        except PackageNotFoundError:
            reqs = []
    for text in reqs:
        req = Requirement(text)
        if req.name == "ray" and req.specifier:
            return req.specifier
    raise UserError(f"{source}: no pinned `ray` requirement among the dependencies")


def _in_checkout() -> bool:
    """True when this module runs from a raycell checkout (ROOT holds raycell's pyproject.toml)."""
    return PYPROJECT.is_file() and 'name = "raycell"' in PYPROJECT.read_text()


# ------------------------------------------------------------------------------------------------
# loading, and schema errors as one line


class _Fail:
    """`fail(msg)` raises `ConfigError("FILE: msg")`: the checks below name keys, this the file."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, msg: str) -> NoReturn:
        raise ConfigError(f"{self.path}: {msg}")


def _read_yaml(path: Path) -> list:
    """All non-empty YAML documents of a file; a missing file or a syntax error is one line."""
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a YAML file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from exc
    try:
        docs = [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {_yaml_problem(exc)}") from exc
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if not docs:
        raise ConfigError(f"{path}: empty file (expected a YAML mapping)")
    return docs


class _DuplicateKey(Exception):
    pass


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping.

    PyYAML keeps the last silently, kubectl refuses the file: either way the first value is lost.
    """

    def construct_mapping(self, node, deep=False):
        """The mapping, after checking that no key repeats."""
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _DuplicateKey(
                    f"key {key!r} given twice, at lines {seen[key]} and "
                    f"{key_node.start_mark.line + 1} (YAML keeps only the last)"
                )
            if isinstance(key, (str, int, float, bool)):
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """`YAML syntax error at line L, column C: problem (context)` from a PyYAML error."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = getattr(exc, "problem", None) or " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    return f"YAML syntax error{where}: {what}" + (f" ({context})" if context else "")


def _one_mapping(path: Path, docs: list) -> dict:
    if len(docs) != 1:
        raise ConfigError(f"{path}: {len(docs)} YAML documents; expected one")
    if not isinstance(docs[0], dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level, got {_kind(docs[0])}")
    return docs[0]


def _key(parts: list | tuple) -> str:
    """`a.b[0].c` from a JSON path; `<top level>` for the root."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


_KINDS = {
    dict: "a mapping",
    list: "a list",
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    type(None): "empty (null)",
}
_WANT = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "boolean": "true or false",
    "integer": "an integer",
    "number": "a number",
    "null": "empty (null)",
}


def _kind(value: Any) -> str:
    return _KINDS.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _schema_check(path: Path, doc: dict, schema: dict) -> None:
    """Raise the most relevant schema violation as one line (saying how many more there are)."""
    import jsonschema
    from jsonschema.exceptions import best_match

    formats = jsonschema.FormatChecker()
    formats.checks("int32")(lambda v: not isinstance(v, int) or -(2**31) <= v <= INT32_MAX)
    formats.checks("int64")(lambda v: not isinstance(v, int) or -(2**63) <= v < 2**63)
    errors = list(jsonschema.Draft7Validator(schema, format_checker=formats).iter_errors(doc))
    if not errors:
        return
    more = ""
    if len(errors) > 1:
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    raise ConfigError(f"{path}: {_schema_message(best_match(errors))}{more}")


def _schema_message(err: Any) -> str:
    """What is wrong, after the key path; an unknown key comes with a close match and the others."""
    path, v, inst = list(err.absolute_path), err.validator, err.instance
    if v == "additionalProperties" and isinstance(inst, dict):
        allowed = sorted(err.schema.get("properties", {}))
        patterns = list(err.schema.get("patternProperties", {}))
        extra = [
            k for k in inst if k not in allowed and not any(re.search(p, str(k)) for p in patterns)
        ]
        key = str(extra[0]) if extra else "?"
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return (
            f"unknown key '{_key(path + [key])}'{hint}; valid keys in '{_key(path)}': "
            f"{', '.join(allowed)}"
        )
    if v == "required" and isinstance(inst, dict):
        missing = [k for k in err.validator_value if k not in inst]
        return f"missing required key '{_key(path + missing[:1])}'"
    if v == "type":
        want = err.validator_value
        wanted = " or ".join(_WANT.get(w, w) for w in (want if isinstance(want, list) else [want]))
        return f"{_key(path)} must be {wanted}, got {_kind(inst)} {_short(inst)}"
    if v == "enum":
        return (
            f"{_key(path)} must be one of {', '.join(map(repr, err.validator_value))}, "
            f"got {_short(inst)}"
        )
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[v]
        return f"{_key(path)} must be {op} {err.validator_value}, got {_short(inst)}"
    if v == "format":
        return f"{_key(path)} must be a valid {err.validator_value}, got {_short(inst)}"
    return f"{_key(path)}: {' '.join(err.message.split())}"


# ------------------------------------------------------------------------------------------------
# cluster.yaml (Ray cluster launcher)


def _launcher_schema() -> dict:
    """The cluster-launcher schema shipped in the installed Ray wheel (found without importing)."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "Ray is not installed: the cluster.yaml check reads its schema (pip install -e .)"
        )
    schema = Path(list(spec.submodule_search_locations)[0]) / "autoscaler" / "ray-schema.json"
    return json.loads(schema.read_text())


def _check_launcher(fail: _Fail, cfg: dict) -> None:
    """What raycell expects of a launcher config, beyond Ray's schema."""
    pin = ray_pin()
    nodes = cfg.get("available_node_types") or {}
    if nodes:
        _check_node_types(fail, cfg, nodes)

    docker = cfg.get("docker") or {}
    has_image = docker.get("image") or (docker.get("head_image") and docker.get("worker_image"))
    if docker.get("container_name") and not has_image:
        fail(
            "missing required key 'docker.image' (docker.container_name is set; or give both "
            "docker.head_image and docker.worker_image)"
        )
    if has_image and not docker.get("container_name"):
        fail(
            "missing required key 'docker.container_name' (docker.image is set: Ray runs the "
            "setup and start commands in that container)"
        )
    images = [(f"docker.{k}", docker.get(k)) for k in ("image", "head_image", "worker_image")]
    images += [
        (f"available_node_types.{n}.docker.worker_image", _get(t, "docker", "worker_image"))
        for n, t in nodes.items()
    ]
    for key, image in images:
        if image and (problem := _image_problem(key, image, pin)):
            fail(problem)

    commands = [
        (f"{k}[{i}]", c)
        for k in ("setup_commands", "head_setup_commands", "worker_setup_commands")
        for i, c in enumerate(cfg.get(k) or [])
    ]
    commands += [
        (f"available_node_types.{n}.worker_setup_commands[{i}]", c)
        for n, t in nodes.items()
        for i, c in enumerate(t.get("worker_setup_commands") or [])
    ]
    for key, command in commands:
        for m in re.finditer(r"(?<![\w.-])ray(\[[^\]]*\])?\s*==\s*([0-9][\w.*+!-]*)", command):
            if not _version_ok(m.group(2).replace(".*", ".0"), pin):
                fail(
                    f"{key} installs ray=={m.group(2)}, but raycell pins ray{pin} "
                    f"({PYPROJECT.name})"
                )
    installs = [
        (k, c) for k, c in commands if re.search(r"\bpip3?\s+install\b", c) and "raycell" in c
    ]
    if not installs:
        fail(
            "setup_commands: no setup command installs raycell (e.g. `pip install -e "
            "/home/ubuntu/raycell` with file_mounts {/home/ubuntu/raycell: .}): the nodes would "
            "lack raycell and its pinned dependencies"
        )
    mounts = [str(m).rstrip("/") for m in (cfg.get("file_mounts") or {})]
    for key, command in installs:
        for target in _install_targets(command):
            local = target.startswith(("/", "~")) and "raycell" in target
            if local and not any(target == m or target.startswith(m + "/") for m in mounts):
                fail(
                    f"{key} installs {target}, but file_mounts does not copy the repository "
                    f"there (add file_mounts: {{{target}: .}})"
                )


def _check_node_types(fail: _Fail, cfg: dict, nodes: dict) -> None:
    """A head with CPU 0, and worker bounds that agree with each other and with max_workers."""
    head, cap = cfg.get("head_node_type"), cfg.get("max_workers")
    if head is None:
        fail(
            f"missing required key 'head_node_type' (which of available_node_types is the head: "
            f"{', '.join(nodes)})"
        )
    if head not in nodes:
        fail(f"head_node_type {head!r} is not one of available_node_types: {', '.join(nodes)}")
    cpu = _get(nodes[head], "resources", "CPU")
    if cpu != 0:
        got = "nothing (Ray would count the head's CPUs)" if cpu is None else repr(cpu)
        fail(
            f"available_node_types.{head}.resources.CPU must be 0 (no work on the head: Train "
            f"workers and Ray Data tasks belong on the GPU nodes), got {got}"
        )
    workers = {name: t for name, t in nodes.items() if name != head}
    if not workers:
        fail(f"available_node_types: no worker node type besides the head {head!r}")
    for name, t in workers.items():
        key = f"available_node_types.{name}"
        lo, hi = t.get("min_workers", 0), t.get("max_workers", cap)
        if hi is not None and lo > hi:
            fail(f"{key}.min_workers ({lo}) is larger than {key}.max_workers ({hi})")
        if cap is not None and hi is not None and hi > cap:
            fail(
                f"{key}.max_workers ({hi}) is larger than the cluster's max_workers ({cap}): "
                f"the autoscaler would stop at {cap}"
            )
    if all(t.get("max_workers", cap) == 0 for t in workers.values()):
        keys = ", ".join(f"available_node_types.{n}.max_workers" for n in workers)
        fail(f"{keys}: every worker node type has max_workers 0 (nothing to train on)")
    total = sum(t.get("min_workers", 0) for t in workers.values())
    if cap is not None and total > cap:
        fail(
            f"max_workers ({cap}) is smaller than the sum of the node types' min_workers ({total})"
        )


def _install_targets(command: str) -> list[str]:
    """What follows `pip install` in a shell line: paths and requirements (no options, extras)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:  # an unbalanced quote: Ray's own shell would fail too; judge the rest
        words = command.split()
    out, after = [], False
    for word in words:
        if word in (";", "&&", "||", "|", "&"):
            after = False
        elif after and not word.startswith("-"):
            out.append(re.sub(r"\[[^\]]*\]$", "", word).rstrip("/"))
        elif word == "install":
            after = True
    return out


def _ray_validate(path: Path, cfg: dict) -> None:
    """Ray's own offline checks: provider defaults from local files, docker and node-type checks."""
    from raycell.utils.ray_private import launcher_provider_types, validate_launcher_config

    kind = cfg["provider"]["type"]  # required by the schema
    known = launcher_provider_types()
    if kind != "external" and kind not in known:
        raise ConfigError(
            f"{path}: provider.type {kind!r} is not a node provider Ray knows: "
            f"{', '.join(known)}, external"
        )
    try:
        validate_launcher_config(copy.deepcopy(cfg))
    except Exception as exc:  # noqa: BLE001  (what Ray finds wrong with the file is the file's)
        raise ConfigError(
            f"{path}: Ray's validate_config: {type(exc).__name__}: {' '.join(str(exc).split())}"
        ) from exc


# ------------------------------------------------------------------------------------------------
# RayJob (KubeRay)


def _rayjob_schema() -> dict:
    """The vendored RayJob CRD schema, closed: unknown fields are errors."""
    if not RAYJOB_SCHEMA.is_file():
        raise UserError(
            f"{RAYJOB_SCHEMA}: the RayJob CRD schema shipped with raycell is missing (a broken "
            "install: reinstall raycell)"
        )
    try:
        return _closed(yaml.safe_load(RAYJOB_SCHEMA.read_text())["openAPIV3Schema"])
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise UserError(f"{RAYJOB_SCHEMA}: unreadable RayJob CRD schema ({exc})") from exc


def _closed(schema: Any) -> Any:
    """A copy where each object with `properties` refuses other keys (the API server drops them).

    A `required` field with a `default` leaves `required`: the API server fills defaults in first.
    """
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: ({n: _closed(s) for n, s in v.items()} if k == "properties" else _closed(v))
        for k, v in schema.items()
    }
    props = out.get("properties")
    if isinstance(props, dict) and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
        if "required" in out:
            out["required"] = [k for k in out["required"] if "default" not in props.get(k, {})]
    return out


def _get(d: Any, *keys: str | int) -> Any:
    """`d[k1][k2]...`, or None where a level is missing or of another kind (templates are open)."""
    for k in keys:
        if isinstance(k, int):
            d = d[k] if isinstance(d, list) and -len(d) <= k < len(d) else None
        else:
            d = d.get(k) if isinstance(d, dict) else None
    return d


def _check_rayjob(fail: _Fail, job: dict) -> None:
    """What raycell expects of a RayJob, beyond the CRD's fields."""
    if not _get(job, "metadata", "name"):
        fail("missing required key 'metadata.name'")
    spec = job.get("spec")
    if not isinstance(spec, dict):
        fail("missing required key 'spec'")
    if spec.get("submissionMode", "K8sJobMode") != "InteractiveMode":
        entrypoint = spec.get("entrypoint")
        if not (isinstance(entrypoint, str) and entrypoint.strip()):
            fail(
                "missing required key 'spec.entrypoint' (the command the job runs, e.g. "
                "`python -m raycell train --config configs/gpu_cluster.yaml --data DIR`)"
            )
        _check_entrypoint(fail, entrypoint)
    if "rayClusterSpec" not in spec and "clusterSelector" not in spec:
        fail(
            "missing required key 'spec.rayClusterSpec' (the Ray cluster to create for the job; "
            "or spec.clusterSelector to run on a RayCluster that is already up)"
        )
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if ttl and not spec.get("shutdownAfterJobFinishes"):
        fail(
            f"spec.ttlSecondsAfterFinished is {ttl} but spec.shutdownAfterJobFinishes is not "
            "true: KubeRay then never deletes the cluster (its GPU pods keep running)"
        )
    if "runtimeEnvYAML" in spec:
        try:
            env = yaml.safe_load(spec["runtimeEnvYAML"])
        except yaml.YAMLError as exc:
            fail(f"spec.runtimeEnvYAML: {_yaml_problem(exc)} (lines count inside the string)")
        if env is not None and not isinstance(env, dict):
            fail(
                f"spec.runtimeEnvYAML must hold a YAML mapping (working_dir, pip, env_vars, ...), "
                f"got {_kind(env)}"
            )
    if isinstance(spec.get("rayClusterSpec"), dict):
        _check_ray_cluster(fail, spec["rayClusterSpec"], "spec.rayClusterSpec")


def _check_entrypoint(fail: _Fail, entrypoint: str) -> None:
    """A raycell entrypoint's `--config FILE` must exist in the repository (its working_dir)."""
    try:
        words = shlex.split(entrypoint)
    except ValueError as exc:
        fail(f"spec.entrypoint is not a valid shell command ({exc})")
    if not re.search(r"raycell|jobs/", entrypoint) or not _in_checkout():
        return  # the repository the job runs from is known only in a checkout
    pairs = list(zip(words, words[1:])) + [tuple(w.split("=", 1)) for w in words if "=" in w]
    for flag, value in pairs:
        relative = not value.startswith(("/", "~", "$"))
        if flag in ("--config", "-c") and relative and not (ROOT / value).exists():
            fail(
                f"spec.entrypoint: --config {value} does not exist in the repository "
                f"({ROOT / value}); the job runs from the repository root"
            )


def _check_ray_cluster(fail: _Fail, rcs: dict, at: str) -> None:
    """The Ray version pin, a head without work, worker bounds, one shared storage for all pods."""
    pin = ray_pin()
    version = rcs.get("rayVersion")
    if version is None:
        fail(
            f"missing required key '{at}.rayVersion' (the Ray version of the image; raycell pins "
            f"ray{pin})"
        )
    if not _version_ok(str(version), pin):
        fail(
            f"{at}.rayVersion {_short(version)} does not match raycell's pin ray{pin} "
            f"({PYPROJECT.name})"
        )

    head = rcs["headGroupSpec"]  # required by the CRD schema, checked before
    groups = [(f"{at}.headGroupSpec", head)]
    groups += [
        (f"{at}.workerGroupSpecs[{i}]", g) for i, g in enumerate(rcs.get("workerGroupSpecs") or [])
    ]
    for key, group in groups:
        containers = _get(group, "template", "spec", "containers")
        if not isinstance(containers, list) or not containers:
            fail(
                f"missing required key '{key}.template.spec.containers' (the Ray container "
                "comes first)"
            )
        for j in range(len(containers)):
            image = _get(containers, j, "image")
            if not isinstance(image, str) or not image:
                fail(f"missing required key '{key}.template.spec.containers[{j}].image'")
            if problem := _image_problem(f"{key}.template.spec.containers[{j}].image", image, pin):
                fail(problem)

    cpus = _get(head, "rayStartParams", "num-cpus")
    if cpus != "0":
        got = "nothing (Ray would count the head pod's CPUs)" if cpus is None else _short(cpus)
        fail(
            f'{at}.headGroupSpec.rayStartParams.num-cpus must be "0" (no work on the head: '
            f"Train workers and Ray Data tasks belong on the GPU pods), got {got}"
        )
    _check_worker_groups(fail, groups[1:], at)

    head_storage = _shared_mounts(fail, f"{at}.headGroupSpec", head)
    for key, group in groups[1:]:
        storage = _shared_mounts(fail, key, group)
        if storage != head_storage:
            fail(
                f"{key}.template.spec.containers[0].volumeMounts: shared storage differs from the "
                f"head's (head: {_mounts_text(head_storage)}; this group: "
                f"{_mounts_text(storage)}): every pod must see the same shards, checkpoints and "
                "predictions at the same paths"
            )


def _check_worker_groups(fail: _Fail, workers: list[tuple[str, dict]], at: str) -> None:
    """Explicit, consistent autoscaling bounds; unique group names; some room for work."""
    if not workers:
        fail(
            f"missing required key '{at}.workerGroupSpecs' (the GPU workers; the head runs no work)"
        )
    names: dict[str, str] = {}
    for key, group in workers:
        name = group["groupName"]  # required by the CRD schema
        if name in names:
            fail(f"{key}.groupName {name!r} is used twice (also {names[name]})")
        names[name] = key
        if "maxReplicas" not in group:
            fail(
                f"missing required key '{key}.maxReplicas' (the autoscaling bound; KubeRay's "
                f"default {INT32_MAX} means unbounded)"
            )
        lo, hi = group.get("minReplicas", 0), group["maxReplicas"]
        if lo > hi:
            fail(f"{key}.minReplicas ({lo}) is larger than {key}.maxReplicas ({hi})")
        if "replicas" in group and not lo <= group["replicas"] <= hi:
            fail(
                f"{key}.replicas ({group['replicas']}) is outside [minReplicas, maxReplicas] = "
                f"[{lo}, {hi}]"
            )
    if all(group["maxReplicas"] == 0 for _, group in workers):
        fail(f"{at}.workerGroupSpecs: every group has maxReplicas 0 (nothing to train on)")


def _shared_mounts(fail: _Fail, key: str, group: dict) -> dict[str, str]:
    """{mountPath: claim[/subPath]} of the Ray container's claims; a mount of no volume fails."""
    pod = _get(group, "template", "spec") or {}
    volumes = {v.get("name"): v for v in pod.get("volumes") or [] if isinstance(v, dict)}
    out = {}
    for m, mount in enumerate(_get(pod, "containers", 0, "volumeMounts") or []):
        name = _get(mount, "name")
        if name not in volumes:
            known = ", ".join(map(str, volumes)) or "none"
            fail(
                f"{key}.template.spec.containers[0].volumeMounts[{m}].name {_short(name)} is not "
                f"one of the pod's volumes ({key}.template.spec.volumes: {known})"
            )
        claim = _get(volumes[name], "persistentVolumeClaim", "claimName")
        if claim:
            sub = _get(mount, "subPath")
            out[str(_get(mount, "mountPath"))] = f"{claim}/{sub}" if sub else str(claim)
    return out


def _mounts_text(mounts: dict[str, str]) -> str:
    return ", ".join(f"{p}={c}" for p, c in sorted(mounts.items())) or "none"


# ------------------------------------------------------------------------------------------------
# versions


def _version_ok(text: str, pin: Any) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return pin.contains(Version(text), prereleases=True)
    except InvalidVersion:
        return False


def _pin_example(pin: Any) -> str:
    """A concrete version inside the pin, for messages (`==2.60.*` gives `2.60.0`)."""
    for s in pin:
        if s.operator in ("==", "===", "~=", ">="):
            return s.version.replace(".*", ".0")
    return str(pin)


def _image_problem(key: str, image: str, pin: Any) -> str | None:
    """What is wrong with a rayproject/ray image's tag for the pin, if anything; others pass."""
    name = image.split("@", 1)[0]
    repo, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
    if repo.rsplit("/", 2)[-2:] not in (
        ["rayproject", "ray"],
        ["rayproject", "ray-ml"],
        ["rayproject", "ray-llm"],
    ):
        return None  # a custom image: its Ray version cannot be read from the name
    example = f"{repo}:{_pin_example(pin)}-py311-gpu"
    version = tag.split("-", 1)[0]
    if not re.fullmatch(r"\d+\.\d+\.\d+\w*", version):
        return (
            f"{key} {image!r} does not name a Ray version (raycell pins ray{pin}): use e.g. "
            f"{example}"
        )
    if not _version_ok(version, pin):
        return (
            f"{key} {image!r} carries Ray {version}, but raycell pins ray{pin} "
            f"({PYPROJECT.name}): use e.g. {example}"
        )
    return None
