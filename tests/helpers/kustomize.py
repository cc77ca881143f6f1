"""Render the k8s/ kustomizations in Python, for tests on machines without kustomize.

It implements exactly the subset the manifests use, and refuses anything else so a new
feature in a kustomization cannot be silently ignored: ``resources`` (files and
directories), ``labels`` (pairs added to metadata.labels), ``images`` (newName,
newTag, digest) and ``patches`` given as JSON 6902 operations (inline or in a file)
with a ``target`` of kind and name.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "labels", "images", "patches"}


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kustomize build directory`` would produce (for the supported subset)."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise ValueError(f"{directory}/kustomization.yaml uses {sorted(unknown)}, which this renderer does not implement")
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        objects += render(path) if path.is_dir() else [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in spec.get("patches", []):
        ops = yaml.safe_load(patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text())
        targets = [o for o in objects if o["kind"] == patch["target"]["kind"] and o["metadata"]["name"] == patch["target"]["name"]]
        if len(targets) != 1:
            raise ValueError(f"patch target {patch['target']} matches {len(targets)} objects")
        for op in ops:
            apply_json6902(targets[0], op)
    for label in spec.get("labels", []):
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    for image in spec.get("images", []):
        for container in containers(objects):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                name = image.get("newName", name)
                container["image"] = f"{name}@{image['digest']}" if "digest" in image else f"{name}:{image.get('newTag', tag)}"
    return objects


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.lstrip("/").split("/")]


def apply_json6902(document: dict[str, Any], op: dict[str, Any]) -> None:
    """Apply one RFC 6902 add/replace/remove operation in place."""
    *parents, last = _pointer(op["path"])
    node: Any = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) and last != "-" else last
    if op["op"] == "remove":
        del node[key]
    elif op["op"] == "replace":
        if isinstance(node, dict) and key not in node:
            raise KeyError(f"replace of missing path {op['path']}")
        node[key] = copy.deepcopy(op["value"])
    elif op["op"] == "add":
        if isinstance(node, list):
            node.insert(len(node) if key == "-" else key, copy.deepcopy(op["value"]))
        else:
            node[key] = copy.deepcopy(op["value"])
    else:
        raise ValueError(f"JSON patch op {op['op']!r} is not implemented")


def cluster_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The RayCluster specs inside a RayCluster, RayJob or RayService."""
    spec = obj.get("spec", {})
    return [s for s in (spec if obj["kind"] == "RayCluster" else None, spec.get("rayClusterSpec"), spec.get("rayClusterConfig")) if s]


def pod_templates(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every Ray group in ``obj``."""
    out = []
    for spec in cluster_specs(obj):
        out.append((f"{obj['kind']}/{obj['metadata']['name']} head", spec["headGroupSpec"]["template"]))
        for group in spec.get("workerGroupSpecs", []):
            out.append((f"{obj['kind']}/{obj['metadata']['name']} {group['groupName']}", group["template"]))
    return out


def containers(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for obj in objects for _, template in pod_templates(obj) for c in template["spec"]["containers"]]
