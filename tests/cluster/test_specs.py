"""Schema checks of the cluster specs in cluster/ (no Ray cluster, no Kubernetes needed).

* cluster/ray-cluster.yaml goes through Ray's own cluster-launcher validation (ray-schema.json, then
  prepare_config + validate_config, as `ray up` does before it talks to the cloud), plus fedsim's
  assumptions: the head advertises 0 GPUs, every worker type declares GPUs, images are pinned.
* cluster/rayjob.yaml (a ConfigMap and a RayJob) is validated against the KubeRay RayJob CRD's
  openAPIV3Schema vendored (pruned) in cluster/schema/, with the API server's structural rules that
  matter here: unknown fields fail, list-type=map keys are unique. The ConfigMap's fedsim config must
  be a valid fedsim config, and the entrypoint, volume, GPU counts and config must agree.
* Each check is shown to bite: misspelled and nonexistent keys at several depths must fail.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import posixpath
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster" / "ray-cluster.yaml"
RAYJOB_YAML = ROOT / "cluster" / "rayjob.yaml"
SCHEMA_DIR = ROOT / "cluster" / "schema"
RAYJOB_SCHEMA = SCHEMA_DIR / "rayjob-v1.2.json"
CRD_COMMIT = "037e91b0e311e6240431a4dcb111fab341a6f613"

RAY_VERSION = "2.60.0"
PYTHON_TAG = "py311"
GPU_RESOURCE = "nvidia.com/gpu"
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))


def rayjob_documents() -> list[dict]:
    return [d for d in yaml.safe_load_all(RAYJOB_YAML.read_text(encoding="utf-8")) if d is not None]


def only(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} document in {RAYJOB_YAML.name}, found {len(found)}"
    return found[0]


def rayjob() -> dict:
    return only(rayjob_documents(), "RayJob")


def configmap() -> dict:
    return only(rayjob_documents(), "ConfigMap")


def rayjob_schema() -> dict:
    return json.loads(RAYJOB_SCHEMA.read_text(encoding="utf-8"))


def load_pruner():
    spec = importlib.util.spec_from_file_location("prune_crd", SCHEMA_DIR / "prune_crd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Validators
# ---------------------------------------------------------------------------------------------


def ray_validate(config: dict) -> dict:
    """What `ray up` checks before it talks to the cloud: the raw file against ray-schema.json, then the
    config merged with the provider's defaults through prepare_config + validate_config."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text(encoding="utf-8"))
    jsonschema.validate(copy.deepcopy(config), schema)
    prepared = util.prepare_config(copy.deepcopy(config))
    util.validate_config(prepared)
    return prepared


def list_map_errors(schema: dict, instance, path: str = "") -> list[str]:
    """Duplicate keys in x-kubernetes-list-type=map lists (the API server rejects them)."""
    errors: list[str] = []
    if not isinstance(schema, dict):
        return errors
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in instance.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                errors += list_map_errors(sub, value, f"{path}.{key}")
    elif isinstance(instance, list):
        items = schema.get("items", {})
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            item_props = items.get("properties", {})
            seen = set()
            for element in instance:
                if not isinstance(element, dict):
                    continue
                ident = tuple(element.get(k, item_props.get(k, {}).get("default")) for k in keys)
                if ident in seen:
                    errors.append(f"{path}: duplicate {dict(zip(keys, ident))}")
                seen.add(ident)
        for i, element in enumerate(instance):
            errors += list_map_errors(items, element, f"{path}[{i}]")
    return errors


def validate_rayjob(doc: dict) -> None:
    """Raise if `doc` is not a RayJob the pinned KubeRay CRD accepts."""
    schema = rayjob_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(doc)
    duplicates = list_map_errors(schema, doc)
    if duplicates:
        raise jsonschema.ValidationError("; ".join(duplicates))
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert DNS1123_SUBDOMAIN.match(doc["metadata"]["name"]), doc["metadata"]["name"]


# core/v1 ConfigMap: its complete list of top-level fields.
CONFIGMAP_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "data"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "v1"},
        "kind": {"const": "ConfigMap"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": DNS1123_SUBDOMAIN.pattern},
                           "labels": {"type": "object", "additionalProperties": {"type": "string"}}},
        },
        "data": {"type": "object", "additionalProperties": {"type": "string"}},
        "binaryData": {"type": "object", "additionalProperties": {"type": "string"}},
        "immutable": {"type": "boolean"},
    },
}


# ---------------------------------------------------------------------------------------------
# Mutations for the negative tests
# ---------------------------------------------------------------------------------------------


def at(doc, path: str):
    """The node at a dotted path; list indices as numbers: spec.rayClusterSpec.workerGroupSpecs.0"""
    node = doc
    for part in path.split(".") if path else []:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def rename(path: str, old: str, new: str):
    def apply(doc):
        node = at(doc, path)
        node[new] = node.pop(old)
    return apply


def put(path: str, key: str, value):
    def apply(doc):
        at(doc, path)[key] = value
    return apply


def delete(path: str, key: str):
    def apply(doc):
        del at(doc, path)[key]
    return apply


def mutated(doc: dict, mutation) -> dict:
    doc = copy.deepcopy(doc)
    mutation(doc)
    return doc


# ---------------------------------------------------------------------------------------------
# cluster/ray-cluster.yaml
# ---------------------------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_validator():
    prepared = ray_validate(cluster_config())
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_cluster_head_has_no_gpus():
    cfg = cluster_config()
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert "GPU" in head["resources"], "declare GPU: 0 on the head, or AWS autodetection could give it GPUs"
    assert head["resources"]["GPU"] == 0


def test_cluster_gpu_worker_types_declare_gpus():
    cfg = cluster_config()
    workers = {name: t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]}
    assert workers, "no worker node types"
    for name, node_type in workers.items():
        gpus = node_type["resources"].get("GPU", 0)
        assert isinstance(gpus, int) and gpus > 0, f"worker type {name} declares no GPU"
        assert node_type.get("min_workers", 0) <= node_type["max_workers"] <= cfg["max_workers"], name
    assert {t["resources"]["GPU"] for t in workers.values()} >= {1, 8}, "expected a 1-GPU and an 8-GPU type"


def test_cluster_scales_down_and_pins_images():
    cfg = cluster_config()
    assert cfg["idle_timeout_minutes"] > 0
    docker = cfg["docker"]
    tag = re.compile(rf"^rayproject/ray:{re.escape(RAY_VERSION)}-{PYTHON_TAG}-(cpu|gpu|cu\d+)$")
    assert tag.match(docker["head_image"]) and docker["head_image"].endswith("-cpu"), docker["head_image"]
    assert tag.match(docker["worker_image"]) and not docker["worker_image"].endswith("-cpu"), docker["worker_image"]
    assert "image" not in docker


def test_cluster_installs_fedsim_from_the_working_tree_through_the_lock():
    cfg = cluster_config()
    remote = [r for r, local in cfg["file_mounts"].items() if local in (".", "./")]
    assert len(remote) == 1, "the working tree ('.') should be mounted on the nodes"
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any(cmd.split()[:2] == ["pip", "install"] and cmd.split()[-1] == remote[0]
                   and f"-c {remote[0]}/constraints.txt" in cmd for cmd in cfg[key]), key
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert "constraints.txt" in dockerfile.split("COPY")[1] and "pip install --no-cache-dir -c constraints.txt ." in dockerfile


CLUSTER_MUTATIONS = {
    "misspelled top-level key": rename("", "idle_timeout_minutes", "idle_timeout_minute"),
    "misspelled node-type key": rename("available_node_types.gpu-a10g-1x", "min_workers", "min_worker"),
    "nonexistent docker key": put("docker", "imagee", "rayproject/ray:2.60.0-py311-gpu"),
    "nonexistent node-type key": put("available_node_types.gpu-a100-8x", "gpus", 8),
    "fractional GPU resource": put("available_node_types.gpu-a10g-1x.resources", "GPU", 0.5),
    "provider without type": delete("provider", "type"),
    "unknown head node type": put("", "head_node_type", "head"),
    "node type without resources": delete("available_node_types.gpu-a100-8x", "resources"),
}


@pytest.mark.parametrize("mutation", CLUSTER_MUTATIONS.values(), ids=CLUSTER_MUTATIONS.keys())
def test_cluster_yaml_rejects(mutation):
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(mutated(cluster_config(), mutation))


# ---------------------------------------------------------------------------------------------
# cluster/rayjob.yaml: the RayJob against the KubeRay CRD
# ---------------------------------------------------------------------------------------------


def test_vendored_schema_names_its_source():
    schema = rayjob_schema()
    comment = schema["$comment"]
    assert "ray-project/kuberay" in comment and "ray.io_rayjobs.yaml" in comment and CRD_COMMIT in comment
    spec = schema["properties"]["spec"]
    assert spec["additionalProperties"] is False and spec["required"] == ["entrypoint"]
    # Full property lists on used paths: fields the manifest does not use are still known.
    assert {"suspend", "submitterPodTemplate", "clusterSelector", "runtimeEnvYAML"} <= set(spec["properties"])
    pod = spec["properties"]["rayClusterSpec"]["properties"]["headGroupSpec"]["properties"]["template"]["properties"]["spec"]
    assert len(pod["properties"]) == 39 and pod["additionalProperties"] is False  # the whole PodSpec of k8s 1.30
    assert pod["properties"]["affinity"] == {}  # untouched subtree, collapsed


def test_rayjob_matches_the_crd():
    validate_rayjob(rayjob())


def test_rayjob_uses_no_collapsed_schema():
    """Every field the manifest uses has its real schema in the vendored file; a field that landed on a
    collapsed {} would pass unchecked: regenerate the file with cluster/schema/prune_crd.py."""
    def walk(schema, instance, path):
        assert schema != {}, f"{path} is used by the manifest but pruned from {RAYJOB_SCHEMA.name}"
        if isinstance(instance, dict) and ("properties" in schema or isinstance(schema.get("additionalProperties"), dict)):
            for key, value in instance.items():
                walk(schema.get("properties", {}).get(key, schema.get("additionalProperties")), value, f"{path}.{key}")
        elif isinstance(instance, list) and "items" in schema:
            for i, value in enumerate(instance):
                walk(schema["items"], value, f"{path}[{i}]")

    walk(rayjob_schema(), rayjob(), "RayJob")


def test_rayjob_settings():
    spec = rayjob()["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert spec["rayClusterSpec"]["rayVersion"] == RAY_VERSION
    for container in containers(spec):
        assert f"ray{RAY_VERSION}-{PYTHON_TAG}" in container["image"], container["image"]


HEAD = "spec.rayClusterSpec.headGroupSpec"
WORKER = "spec.rayClusterSpec.workerGroupSpecs.0"

RAYJOB_MUTATIONS = {
    "misspelled spec key": rename("spec", "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
    "nonexistent top-level key": put("", "specs", {}),
    "nonexistent rayClusterSpec key": put("spec.rayClusterSpec", "headGroup", {}),
    "misspelled headGroupSpec key": rename(HEAD, "rayStartParams", "rayStartParam"),
    "misspelled worker group key": rename(WORKER, "groupName", "groupname"),
    "nonexistent pod spec key": put(f"{HEAD}.template.spec", "gpus", 1),
    "misspelled container key": put(f"{HEAD}.template.spec.containers.0", "imagePullPolcy", "Always"),
    "nonexistent container key": put(f"{WORKER}.template.spec.containers.0", "gpu", 1),
    "misspelled resources key": rename(f"{WORKER}.template.spec.containers.0.resources", "limits", "limit"),
    "misspelled volume mount key": rename(f"{HEAD}.template.spec.containers.0.volumeMounts.0", "mountPath", "mountpath"),
    "misspelled configMap volume key": rename(f"{HEAD}.template.spec.volumes.0.configMap", "name", "nmae"),
    "misspelled toleration key": rename(f"{WORKER}.template.spec.tolerations.0", "operator", "operater"),
    "nonexistent pod metadata key": put(f"{HEAD}.template.metadata", "label", {"a": "b"}),
    "rayStartParams value not a string": put(f"{HEAD}.rayStartParams", "num-gpus", 0),
    "replicas not an integer": put(WORKER, "replicas", "2"),
    "bad resource quantity": put(f"{WORKER}.template.spec.containers.0.resources.limits", "memory", "48 GB"),
    "missing entrypoint": delete("spec", "entrypoint"),
    "worker group without template": delete(WORKER, "template"),
    "duplicate volume names": lambda d: at(d, f"{HEAD}.template.spec.volumes").append(
        copy.deepcopy(at(d, f"{HEAD}.template.spec.volumes.0"))),
}


@pytest.mark.parametrize("mutation", RAYJOB_MUTATIONS.values(), ids=RAYJOB_MUTATIONS.keys())
def test_rayjob_rejects(mutation):
    with pytest.raises(jsonschema.ValidationError):
        validate_rayjob(mutated(rayjob(), mutation))


# ---------------------------------------------------------------------------------------------
# cluster/rayjob.yaml: the ConfigMap, its fedsim config, and how they fit the RayJob
# ---------------------------------------------------------------------------------------------


def containers(spec: dict) -> list[dict]:
    cluster = spec["rayClusterSpec"]
    groups = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def gpus_of(group: dict) -> float:
    total = 0.0
    for c in group["template"]["spec"]["containers"]:
        for part in ("limits", "requests"):
            value = c.get("resources", {}).get(part, {}).get(GPU_RESOURCE)
            if value is not None:
                total = max(total, float(value))
    return total


def entrypoint_config(job: dict, cm: dict, tmp_path: Path) -> tuple[Path, list[str]]:
    """The config file the entrypoint names, read from the ConfigMap through the head's volume mount."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["fedsim", "run"], argv
    items = argv[2:]
    paths = [i for i in items if "=" not in i and not i.startswith("-")]
    overrides = [i for i in items if "=" in i]
    assert len(paths) == 1, f"expected one config path in the entrypoint, got {paths}"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount_dir, key = posixpath.split(paths[0])
    mounts = [m for m in head["containers"][0].get("volumeMounts", []) if m["mountPath"].rstrip("/") == mount_dir]
    assert len(mounts) == 1, f"no volume is mounted at {mount_dir} in the head container"
    volume = next(v for v in head["volumes"] if v["name"] == mounts[0]["name"])
    assert volume.get("configMap", {}).get("name") == cm["metadata"]["name"], "the config volume is not the ConfigMap"
    assert key in cm["data"], f"the ConfigMap has no key {key}"
    path = tmp_path / key
    path.write_text(cm["data"][key], encoding="utf-8")
    return path, overrides


def test_configmap_is_a_configmap():
    jsonschema.validate(configmap(), CONFIGMAP_SCHEMA)
    docs = rayjob_documents()
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"], "apply the ConfigMap before the RayJob"
    assert {d["metadata"].get("namespace") for d in docs} == {None}, "both in the namespace of kubectl apply"


def test_configmap_holds_a_valid_fedsim_config(tmp_path):
    from fedsim.config import config_from_dict, load_config_dict

    job, cm = rayjob(), configmap()
    path, overrides = entrypoint_config(job, cm, tmp_path)
    config = config_from_dict(load_config_dict(path, overrides))

    output_dir = config.output_dir
    assert "://" in output_dir or os.path.isabs(output_dir), f"output_dir {output_dir!r} is not shared by the pods"
    assert config.runtime.address in (None, "auto"), "inside a Ray job the runtime connects through RAY_ADDRESS"

    # The worker actors fit on the GPU worker groups, and none needs the head (which has no GPU).
    cluster = job["spec"]["rayClusterSpec"]
    assert gpus_of(cluster["headGroupSpec"]) == 0
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-gpus", "0") == "0"
    groups = cluster["workerGroupSpecs"]
    assert all(gpus_of(grp) > 0 for grp in groups), "every worker group should declare nvidia.com/gpu"
    g = config.runtime.gpus_per_worker
    assert g > 0, "a GPU cluster with runtime.gpus_per_worker: 0 would train on the CPUs"
    # Ray packs floor(gpus_per_pod / gpus_per_worker) actors on a pod; replicas pods per group.
    per_pod = {grp["groupName"]: int(gpus_of(grp) / g + 1e-9) for grp in groups}
    slots = sum(grp["replicas"] * per_pod[grp["groupName"]] for grp in groups)
    assert config.runtime.workers <= slots, f"{config.runtime.workers} worker actors x {g} GPU do not fit {slots} slots"
    for grp in groups:  # and the actors on a pod fit its CPUs
        cpu = str(grp["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        cpu = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
        assert per_pod[grp["groupName"]] * config.runtime.cpus_per_worker <= cpu, grp["groupName"]


def test_invalid_fedsim_config_in_the_configmap_is_caught(tmp_path):
    from fedsim.config import config_from_dict, load_config_dict
    from fedsim.errors import UsageError

    job, cm = rayjob(), configmap()
    key = next(iter(cm["data"]))
    for broken in ({"runtime": {"workerz": 2}}, {"method": {"rank": 0}}, {"clients": {"count": 4, "per_round": 9}}):
        merged = yaml.safe_load(cm["data"][key])
        for section, values in broken.items():
            merged.setdefault(section, {}).update(values)
        bad = copy.deepcopy(cm)
        bad["data"][key] = yaml.safe_dump(merged)
        path, overrides = entrypoint_config(job, bad, tmp_path)
        with pytest.raises(UsageError):
            config_from_dict(load_config_dict(path, overrides))


# ---------------------------------------------------------------------------------------------
# cluster/schema/prune_crd.py
# ---------------------------------------------------------------------------------------------


TOY_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
spec:
  names: {kind: Other}
  versions: [{name: v1, schema: {openAPIV3Schema: {type: object}}}]
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
spec:
  names: {kind: Toy}
  versions:
  - name: v1
    schema:
      openAPIV3Schema:
        type: object
        properties:
          apiVersion: {type: string}
          kind: {type: string}
          spec:
            type: object
            required: [name]
            properties:
              name: {type: string, description: prose}
              unused: {type: object, properties: {deep: {type: string}}}
              labels: {type: object, additionalProperties: {type: string}}
              free: {type: object, x-kubernetes-preserve-unknown-fields: true, properties: {a: {type: string}}}
              items:
                type: array
                x-kubernetes-list-type: map
                x-kubernetes-list-map-keys: [id]
                items:
                  type: object
                  properties:
                    id: {type: integer}
                    x: {type: object, properties: {p: {type: string}, q: {type: string}}}
                    y: {type: object, properties: {r: {type: string}}}
"""

TOY_MANIFEST = {
    "apiVersion": "toy.io/v1", "kind": "Toy",
    "spec": {"name": "a", "labels": {"k": "v"}, "free": {"a": "x", "b": 1},
             "items": [{"id": 1, "x": {"p": "1"}}, {"id": 2, "y": {"r": "2"}}]},
}


def test_pruner_keeps_used_paths_whole_and_collapses_the_rest():
    prune = load_pruner()
    docs = list(yaml.safe_load_all(TOY_CRD))
    out = prune.prune_crd(docs, [TOY_MANIFEST], "Toy", "v1", "toy")
    assert out["$comment"] == "toy" and out["additionalProperties"] is False
    spec = out["properties"]["spec"]
    assert set(spec["properties"]) == {"name", "unused", "labels", "free", "items"}
    assert spec["required"] == ["name"] and spec["additionalProperties"] is False
    assert spec["properties"]["unused"] == {} and "description" not in spec["properties"]["name"]
    assert spec["properties"]["labels"] == {"type": "object", "additionalProperties": {"type": "string"}}
    assert "additionalProperties" not in spec["properties"]["free"]  # x-kubernetes-preserve-unknown-fields
    item = spec["properties"]["items"]["items"]
    # List items keep the union of what every element uses.
    assert item["properties"]["x"]["properties"] == {"p": {"type": "string"}, "q": {}}
    assert item["properties"]["y"]["properties"] == {"r": {"type": "string"}}
    assert spec["properties"]["items"]["x-kubernetes-list-map-keys"] == ["id"]
    jsonschema.Draft7Validator(out).validate(TOY_MANIFEST)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(out).validate({**TOY_MANIFEST, "spec": {**TOY_MANIFEST["spec"], "nmae": "a"}})


def test_pruner_cli_writes_the_schema(tmp_path):
    prune = load_pruner()
    crd, manifest, out = tmp_path / "crd.yaml", tmp_path / "toy.yaml", tmp_path / "toy.json"
    crd.write_text(TOY_CRD, encoding="utf-8")
    manifest.write_text("---\napiVersion: v1\nkind: ConfigMap\n---\n" + yaml.safe_dump(TOY_MANIFEST), encoding="utf-8")
    assert prune.main([str(crd), str(manifest), "--kind", "Toy", "--group-version", "toy.io/v1", "--source", "o/r p.yaml",
                       "--commit", "abc", "--kuberay-version", "v0", "-o", str(out)]) == 0
    written = json.loads(out.read_text(encoding="utf-8"))
    assert "o/r p.yaml" in written["$comment"] and "abc" in written["$comment"]
    assert written["properties"]["spec"]["properties"]["unused"] == {}
