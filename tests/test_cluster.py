"""KubeRay manifests and container image in cluster/: valid, consistent with the repo, secret-free.

The Ray manifests are validated against KubeRay's CRD OpenAPI schemas from
``tests/fixtures/kuberay-crds`` (copied unmodified from KubeRay v1.7.0, see SOURCE.txt there), made strict so that a misspelt field fails.
The other checks cover what a schema cannot express and need only the repository.
"""
from __future__ import annotations

import copy
import functools
import posixpath
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from conftest import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

CLUSTER = REPO / "cluster"
CRD_DIR = REPO / "tests" / "fixtures" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
EXPECTED_FILES = {"raycluster.yaml", "rayjob-certify.yaml", "rayjob-aggregate.yaml",
                  "secret.example.yaml", "s3-config.yaml"}
SECRET_LIKE = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
SHELL_SEPARATORS = {"&&", "||", ";", "|"}


# ---------------------------------------------------------------- reading the repository

def load_manifests() -> list[tuple[str, dict]]:
    """(file name, document) for every YAML document in cluster/."""
    docs = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


MANIFESTS = load_manifests()
RAY_DOCS = [(name, d) for name, d in MANIFESTS if d.get("kind") in CRD_FILES]
RAY_JOBS = [(name, d) for name, d in RAY_DOCS if d["kind"] == "RayJob"]


def doc_id(item: tuple[str, dict]) -> str:
    return f"{item[0]}:{item[1]['kind']}"


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def groups(doc: dict) -> list[tuple[str, dict]]:
    """(group name, group spec) for the head and every worker group of a Ray manifest."""
    spec = cluster_spec(doc)
    return [("head", spec["headGroupSpec"])] + [
        (w["groupName"], w) for w in spec.get("workerGroupSpecs", [])]


def ray_containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pinned_ray() -> str:
    """The exact ray version that pyproject.toml pins (ray==X.Y.Z)."""
    project = pyproject()
    (req,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "ray"]
    (spec,) = req.specifier
    assert spec.operator == "==", f"ray must be pinned exactly in pyproject.toml, got {req}"
    return spec.version


def dockerfile_instruction(name: str) -> str:
    """The argument of the single ``name`` instruction (FROM, WORKDIR) in cluster/Dockerfile."""
    text = (CLUSTER / "Dockerfile").read_text()
    lines = [line.split(None, 1)[1].strip() for line in text.splitlines()
             if line.split(None, 1)[:1] == [name]]
    assert len(lines) == 1, f"cluster/Dockerfile needs exactly one {name}, found {lines}"
    return lines[0]


def image_tag(image: str) -> tuple[str, str]:
    repository, _, tag = image.rpartition(":")
    assert repository and "/" not in tag, f"image {image!r} must carry an explicit tag"
    return repository, tag


def quantity_bytes(q: str | int) -> float:
    """A Kubernetes memory quantity (e.g. 10Gi, 8G, 512Mi, 2000000000) in bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i|[kMGT]?)", str(q))
    assert m, f"unsupported memory quantity {q!r}"
    scale = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    return float(m.group(1)) * scale


def commands(line: str) -> Iterator[list[str]]:
    """The simple commands of a shell line, as argument lists."""
    current: list[str] = []
    for token in shlex.split(line) + [";"]:
        if token in SHELL_SEPARATORS:
            if current:
                yield current
            current = []
        else:
            current.append(token)


def job_invocations(line: str) -> list[tuple[str, list[str]]]:
    """(module, arguments) for each ``python -m jobs.X ...`` command in a shell line."""
    found = []
    for argv in commands(line):
        for i, token in enumerate(argv[:-2]):
            module = argv[i + 2]
            if re.fullmatch(r"python3?", token) and argv[i + 1] == "-m" and module.startswith("jobs."):
                found.append((module, argv[i + 3:]))
    return found


def option_values(args: list[str], option: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == option]


# ---------------------------------------------------------------- strict CRD schemas

def strict(schema: Any) -> Any:
    """A copy of an OpenAPI schema where every object schema with ``properties`` and no
    ``additionalProperties``/``x-kubernetes-preserve-unknown-fields`` rejects unknown keys."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(kind: str) -> dict:
    """The v1 openAPIV3Schema of a KubeRay CRD, exactly as published (lax)."""
    path = CRD_DIR / CRD_FILES[kind]
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@functools.cache
def strict_crd_schema(kind: str) -> dict:
    return strict(crd_schema(kind))


def schema_errors(doc: dict, schema: dict) -> list[str]:
    from jsonschema import Draft7Validator

    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in Draft7Validator(schema).iter_errors(doc)]


@pytest.mark.parametrize("item", RAY_DOCS, ids=doc_id)
def test_ray_manifest_validates_against_strict_crd_schema(item):
    name, doc = item
    assert doc["apiVersion"] == "ray.io/v1"
    errors = schema_errors(doc, strict_crd_schema(doc["kind"]))
    assert not errors, f"{name}:\n" + "\n".join(errors)


TYPOS = [  # (manifest, path to a mapping, key in it, misspelling)
    ("rayjob-certify.yaml", ("spec",), "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
    ("rayjob-certify.yaml", ("spec", "rayClusterSpec"),
     "enableInTreeAutoscaling", "enableInTreeAutoScaling"),
    ("raycluster.yaml", ("spec", "headGroupSpec"), "rayStartParams", "rayStartParam"),
    ("raycluster.yaml", ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0),
     "resources", "resource"),
    ("raycluster.yaml", ("spec", "workerGroupSpecs", 0, "template", "spec", "volumes", 0, "emptyDir"),
     "sizeLimit", "sizelimit"),
]


@pytest.mark.parametrize("manifest,path,key,typo", TYPOS, ids=[t[3] for t in TYPOS])
def test_misspelt_field_fails_only_the_strict_schema(manifest, path, key, typo):
    (doc,) = [copy.deepcopy(d) for name, d in RAY_DOCS if name == manifest]
    schema = crd_schema(doc["kind"])
    node = doc
    for step in path:
        node = node[step]
    node[typo] = node.pop(key)
    assert not schema_errors(doc, schema), "the published schema alone should not see the typo"
    errors = schema_errors(doc, strict_crd_schema(doc["kind"]))
    assert any(f"'{typo}' was unexpected" in e for e in errors), errors


# ---------------------------------------------------------------- what the schema cannot check

def test_cluster_folder_has_the_expected_manifests():
    assert EXPECTED_FILES <= {p.name for p in CLUSTER.glob("*.yaml")}
    for name, doc in MANIFESTS:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), name
        assert doc["metadata"].get("name"), name
    assert {d["kind"] for _, d in RAY_DOCS} == {"RayCluster", "RayJob"}


@pytest.mark.parametrize("item", RAY_DOCS, ids=doc_id)
def test_ray_start_params_are_strings(item):
    for group_name, group in groups(item[1]):
        for key, value in group.get("rayStartParams", {}).items():
            assert isinstance(value, str), f"{item[0]} {group_name}: {key}={value!r} must be a string"


@pytest.mark.parametrize("item", RAY_DOCS, ids=doc_id)
def test_groups_sizing(item):
    """A head with workers runs no tasks; replicas are explicit; GPUs are asked for in limits."""
    name, doc = item
    (_, head), *workers = groups(doc)
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0", name
    if doc["kind"] == "RayCluster" or workers:
        assert head["rayStartParams"].get("num-cpus") == "0", f"{name}: head must not run tasks"
    for group_name, w in workers:
        assert "minReplicas" in w and "maxReplicas" in w, f"{name} {group_name}"
        assert 0 <= w["minReplicas"] <= w.get("replicas", w["minReplicas"]) <= w["maxReplicas"]
    gpu_groups = [g for g, w in workers if any(
        "nvidia.com/gpu" in c["resources"].get("limits", {}) for c in ray_containers(w))]
    if doc["kind"] == "RayCluster" or "jobs.certify" in doc["spec"].get("entrypoint", ""):
        assert gpu_groups and len(gpu_groups) < len(workers), f"{name}: needs GPU and CPU groups"
        assert cluster_spec(doc)["enableInTreeAutoscaling"] is True
        assert cluster_spec(doc)["autoscalerOptions"]


@pytest.mark.parametrize("item", RAY_DOCS, ids=doc_id)
def test_every_container_has_requests_and_limits(item):
    for group_name, group in groups(item[1]):
        for c in ray_containers(group):
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"].get(kind, {})), \
                    f"{item[0]} {group_name}/{c['name']}: {kind} needs cpu and memory"


@pytest.mark.parametrize("item", RAY_DOCS, ids=doc_id)
def test_shm_holds_the_object_store_within_the_memory_limit(item):
    """object-store-memory <= /dev/shm (Memory emptyDir) size < the container memory limit."""
    for group_name, group in groups(item[1]):
        pod = group["template"]["spec"]
        where = f"{item[0]} {group_name}"
        store = group["rayStartParams"].get("object-store-memory")
        assert store is not None, f"{where}: set object-store-memory explicitly"
        (container,) = ray_containers(group)
        (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory", where
        shm = quantity_bytes(volume["emptyDir"]["sizeLimit"])
        limit = quantity_bytes(container["resources"]["limits"]["memory"])
        assert int(store) <= shm < limit, f"{where}: store {store}, shm {shm:.3g}, limit {limit:.3g}"


def test_ray_version_matches_pyproject_pin_and_dockerfile_base():
    version = pinned_ray()
    for name, doc in RAY_DOCS:
        assert cluster_spec(doc)["rayVersion"] == version, name
    base_repo, base_tag = image_tag(dockerfile_instruction("FROM"))
    assert base_repo == "rayproject/ray"
    m = re.fullmatch(rf"{re.escape(version)}-py3(\d+)-cu\d+", base_tag)
    assert m, f"base image tag {base_tag!r} must be <pinned ray>-py3XX-cuXXX (a Ray CUDA image)"
    assert SpecifierSet(pyproject()["requires-python"]).contains(f"3.{m.group(1)}")


def test_images_agree_across_groups_and_with_the_dockerfile():
    images = {c["image"] for _, doc in RAY_DOCS for _, g in groups(doc) for c in ray_containers(g)}
    assert len(images) == 1, f"all Ray pods must run one image, found {sorted(images)}"
    _, base_tag = image_tag(dockerfile_instruction("FROM"))
    assert image_tag(images.pop())[1] == base_tag


def test_entrypoints_name_existing_modules_and_configs():
    """RayJob entrypoints and the README's commands run jobs/<x>.py with configs in the repo."""
    lines = [(name, doc["spec"]["entrypoint"]) for name, doc in RAY_JOBS]
    readme = (CLUSTER / "README.md").read_text()
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", readme, flags=re.M | re.S):
        lines += [("README.md", line) for line in block.replace("\\\n", " ").splitlines()
                  if "python -m jobs." in line]
    seen = set()
    for where, line in lines:
        invocations = job_invocations(line)
        assert invocations, f"{where}: no `python -m jobs.<name>` command in {line!r}"
        for module, args in invocations:
            seen.add(module)
            assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"{where}: {module} missing"
            for config in option_values(args, "--config"):
                assert (REPO / config).is_file(), f"{where}: config {config} missing"
    assert {"jobs.certify", "jobs.aggregate"} <= seen


def test_docker_build_context_leaves_out_local_state():
    """The image copies the repository (COPY . .); .dockerignore must keep the venv and git out."""
    ignored = {line.strip().strip("/") for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git"} <= ignored, f".dockerignore must list .venv and .git, has {sorted(ignored)}"


def test_rayjobs_run_in_the_image_copy_of_the_repo():
    workdir = dockerfile_instruction("WORKDIR")
    for name, doc in RAY_JOBS:
        runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        assert runtime_env["working_dir"] == workdir, name
        spec = doc["spec"]
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0, name
        assert spec["backoffLimit"] >= 0, name


def test_certify_job_config_resolves_and_fits_the_gpu_groups():
    """The certify RayJob's config + overrides validate, and its GPU actors fit at maxReplicas."""
    from pipeline.config import load_config

    (doc,) = [d for _, d in RAY_JOBS if "jobs.certify" in d["spec"]["entrypoint"]]
    ((_, args),) = job_invocations(doc["spec"]["entrypoint"])
    (config_path,) = option_values(args, "--config")
    config = load_config(str(REPO / config_path), option_values(args, "--set"))
    gpus = sum(w["maxReplicas"] * float(c["resources"]["limits"].get("nvidia.com/gpu", 0))
               for _, w in groups(doc)[1:] for c in ray_containers(w))
    needed = config.compute["actors"] * config.compute["gpus_per_actor"]
    assert 0 < needed <= gpus, f"{needed} GPUs for actors, {gpus} at maxReplicas"


# ---------------------------------------------------------------- no secrets in the repository

def walk(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def test_credentials_come_from_the_secret_only():
    (secret,) = [d for _, d in MANIFESTS if d["kind"] == "Secret"]
    for key, value in secret.get("stringData", {}).items():
        assert re.fullmatch(r"<[a-z-]+>", value), f"secret.example.yaml {key}: placeholder only"
    assert not secret.get("data"), "secret.example.yaml must not carry encoded values"
    for name, doc in MANIFESTS:
        for node in walk(doc):
            if {"name", "value"} <= set(node) and SECRET_LIKE.search(str(node["name"])):
                raise AssertionError(f"{name}: {node['name']} has a literal value")
        if doc["kind"] == "ConfigMap":
            assert not any(SECRET_LIKE.search(k) for k in doc["data"]), name
    for name, doc in RAY_JOBS:
        env_vars = (yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}") or {}).get("env_vars", {})
        assert not any(SECRET_LIKE.search(k) for k in env_vars), name
    for name, doc in RAY_DOCS:
        for group_name, g in groups(doc):
            for c in ray_containers(g):
                refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c.get("env", [])
                        if "secretKeyRef" in e.get("valueFrom", {})}
                for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    assert refs.get(var) == {"name": secret["metadata"]["name"], "key": var}, \
                        f"{name} {group_name}: {var} must come from the Secret"
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", path.read_text()), path


# ---------------------------------------------------------------- the aggregate entrypoint, run

def test_aggregate_entrypoint_runs_against_s3(s3_bucket, tmp_path):
    """The aggregate RayJob's entrypoint line, run by a shell as on the head, reads a run from a
    real S3 server and leaves the tables in {run}/aggregate/; a retry overwrites them in place."""
    import os
    import subprocess
    import sys

    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.counts_schema import REQUIRED_FIELDS

    (doc,) = [d for _, d in RAY_JOBS if "jobs.aggregate" in d["spec"]["entrypoint"]]
    line = doc["spec"]["entrypoint"].replace("YOUR_BUCKET", s3_bucket)
    ((_, args),) = job_invocations(line)
    out_uri = option_values(args, "--out")[0]
    run_uri = args[0]
    assert out_uri == f"{run_uri}/aggregate"
    samples = [  # (label, selection counts, estimation counts) as {class: count}
        (0, {0: 10}, {0: 95, 1: 5}), (1, {1: 10}, {1: 100}), (2, {0: 10}, {0: 60, 2: 40})]
    rows = [dict(run_id="r", image_id=f"img{i}", label=label, sigma=0.5, n0=10, n=100,
                 counts0_classes=sorted(c0), counts0_values=[c0[k] for k in sorted(c0)],
                 counts_classes=sorted(c), counts_values=[c[k] for k in sorted(c)],
                 num_classes=3, pred_clean=label) for i, (label, c0, c) in enumerate(samples)]
    fs, run_path = fsspec.core.url_to_fs(run_uri)
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(REQUIRED_FIELDS)),
                   f"{run_path}/counts/part-0.parquet", filesystem=fs)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for _ in range(2):
        done = subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    local_line = line.replace(out_uri, str(tmp_path / "aggregate"))  # the same tables, written locally
    done = subprocess.run(["bash", "-c", local_line], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    local = {p.name: p.read_bytes() for p in (tmp_path / "aggregate").iterdir()}
    fs.invalidate_cache()
    remote = {posixpath.relpath(p, f"{run_path}/aggregate"): fs.cat_file(p)
              for p in fs.find(f"{run_path}/aggregate")}
    assert local and remote == local
