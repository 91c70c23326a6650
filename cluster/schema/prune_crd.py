"""Prune a CustomResourceDefinition's openAPIV3Schema to the paths a manifest uses.

    python cluster/schema/prune_crd.py ray.io_rayjobs.yaml cluster/rayjob.yaml \
        --source "ray-project/kuberay helm-chart/kuberay-operator/crds/ray.io_rayjobs.yaml" \
        --commit 037e91b0e311e6240431a4dcb111fab341a6f613 --kuberay-version v1.2 \
        -o cluster/schema/rayjob-v1.2.json

The full KubeRay RayJob CRD is over a megabyte (the pod templates are the whole Kubernetes PodSpec,
three times). The test suite only needs the part a manifest can touch, so this keeps:

* every object schema on a path the manifest uses, with its *full* list of property names, its
  `required` list, types, formats, enums, defaults and patterns, plus `additionalProperties: false`
  where the CRD lists properties (a structural schema: the API server prunes or, with strict field
  validation, rejects unknown fields; here they fail validation), unless the CRD says
  `x-kubernetes-preserve-unknown-fields`;
* list item schemas for the union of what all the manifest's list elements use;
* map value schemas (`additionalProperties`) for the union of what all the values use;

and collapses every property the manifest does not use to `{}` (allowed, not checked), so a
misspelled or nonexistent key anywhere on a used path fails while the file stays small. The output
is a JSON Schema (draft 7; the CRD's OpenAPI v3 subset reads the same) with a `$comment` naming the
source. Re-run this on the full CRD of another KubeRay version, or after the manifest starts using a
new field, to regenerate the vendored file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

# Keywords that hold sub-schemas; everything else on a schema node is copied verbatim.
_SUBSCHEMA_KEYS = ("properties", "items", "additionalProperties")
# Dropped: prose only (KubeRay generates its CRDs with descriptions stripped anyway).
_DROPPED_KEYS = ("description",)


def usage_of(instance: Any) -> dict:
    """A tree of what an instance uses: {"keys": {name: usage}}, {"items": usage}, {"leaf": True}."""
    if isinstance(instance, dict):
        return {"keys": {k: usage_of(v) for k, v in instance.items()}, "values": merge_usage(usage_of(v) for v in instance.values())}
    if isinstance(instance, list):
        return {"items": merge_usage(usage_of(v) for v in instance)}
    return {"leaf": True}


def merge_usage(usages: Iterable[dict | None]) -> dict | None:
    """Union of usage trees (for list elements, or for the values of a map)."""
    merged: dict | None = None
    for u in usages:
        if u is None:
            continue
        if merged is None:
            merged = {}
        if u.get("leaf"):
            merged["leaf"] = True
        if "keys" in u:
            keys = merged.setdefault("keys", {})
            for k, sub in u["keys"].items():
                keys[k] = merge_usage([keys.get(k), sub])
        for part in ("items", "values"):
            if u.get(part) is not None:
                merged[part] = merge_usage([merged.get(part), u[part]])
    return merged


def prune(schema: dict, use: dict | None) -> dict:
    """`schema` restricted to `use`; an unused node becomes {}."""
    if use is None:
        return {}
    out = {k: v for k, v in schema.items() if k not in _SUBSCHEMA_KEYS and k not in _DROPPED_KEYS}
    if "properties" in schema:
        used_keys = use.get("keys", {})
        out["properties"] = {name: prune(sub, used_keys.get(name)) for name, sub in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if "items" in schema:
        out["items"] = prune(schema["items"], use.get("items")) if isinstance(schema["items"], dict) else schema["items"]
    if "additionalProperties" in schema and "properties" not in schema:
        extra = schema["additionalProperties"]
        out["additionalProperties"] = prune(extra, use.get("values")) if isinstance(extra, dict) else extra
    return out


def crd_schema(crd_docs: list[dict], kind: str, version: str) -> dict:
    """The openAPIV3Schema of `kind` at API `version` in a (possibly multi-document) CRD file."""
    for doc in crd_docs:
        if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
            continue
        if doc.get("spec", {}).get("names", {}).get("kind") != kind:
            continue
        for v in doc["spec"].get("versions", []):
            if v.get("name") == version:
                return v["schema"]["openAPIV3Schema"]
        raise SystemExit(f"CRD for {kind} has no version {version!r}")
    raise SystemExit(f"no CustomResourceDefinition for kind {kind!r} in the CRD file")


def manifests_of(docs: list[Any], api_version: str, kind: str) -> list[dict]:
    return [d for d in docs if isinstance(d, dict) and d.get("kind") == kind and d.get("apiVersion") == api_version]


def prune_crd(crd_docs: list[dict], manifests: list[dict], kind: str, version: str, comment: str) -> dict:
    schema = crd_schema(crd_docs, kind, version)
    use = merge_usage(usage_of(m) for m in manifests)
    if use is None:
        raise SystemExit(f"no {kind} manifest to prune for")
    # The root always keeps apiVersion/kind/metadata/spec/status listed, used or not.
    pruned = prune(schema, use)
    return {"$schema": "http://json-schema.org/draft-07/schema#", "$comment": comment, **pruned}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("crd", help="the full CRD YAML (e.g. ray.io_rayjobs.yaml of the pinned KubeRay release)")
    p.add_argument("manifest", nargs="+", help="manifest YAML file(s); every document of `kind` counts")
    p.add_argument("--kind", default="RayJob")
    p.add_argument("--group-version", default="ray.io/v1", help="apiVersion of the manifests (group/version)")
    p.add_argument("--source", required=True, help="where the CRD came from: repository and path")
    p.add_argument("--commit", required=True, help="commit of the CRD file")
    p.add_argument("--kuberay-version", required=True, help="release line the CRD belongs to, e.g. v1.2.2")
    p.add_argument("--note", default="", help="extra provenance text for the $comment")
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)

    crd_docs = list(yaml.safe_load_all(Path(args.crd).read_text(encoding="utf-8")))
    docs: list[Any] = []
    for path in args.manifest:
        docs.extend(yaml.safe_load_all(Path(path).read_text(encoding="utf-8")))
    manifests = manifests_of(docs, args.group_version, args.kind)
    version = args.group_version.split("/")[-1]
    comment = (
        f"Pruned openAPIV3Schema of KubeRay {args.kuberay_version} {args.kind} ({args.group_version}) from "
        f"{args.source} at commit {args.commit}; generated by cluster/schema/prune_crd.py for "
        f"{', '.join(args.manifest)}: objects on the manifest's paths keep their full property lists "
        "(additionalProperties false), untouched subtrees are collapsed to {}."
        + (f" {args.note}" if args.note else "")
    )
    out = prune_crd(crd_docs, manifests, args.kind, version, comment)
    Path(args.output).write_text(json.dumps(out, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
