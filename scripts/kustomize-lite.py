#!/usr/bin/env python3
"""Render a kustomization the way `kubectl kustomize` does, for the features
deploy/k8s uses and no others: resources (files and kustomization directories),
namespace, labels (metadata only), configMapGenerator (files; behavior create or
replace; with kustomize's name-hash suffix left out), images, and patches (a file with
a strategic-merge patch, or an inline JSON 6902 patch with `replace`/`add` on a target).
Anything else is an error, never ignored.

kustomize itself cannot be installed on the machines the tests run on (no Go toolchain
or kubectl package there); where kubectl is installed, `kubectl kustomize DIR` gives the
same objects (bar the ConfigMap name suffix).

    scripts/kustomize-lite.py deploy/k8s/overlays/production > rendered.yaml
"""
import copy
import os
import sys

import yaml

KNOWN = {"apiVersion", "kind", "resources", "namespace", "labels", "configMapGenerator", "images", "patches"}
# Lists merged by a key under strategic merge (the core types deploy/k8s patches).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name", "ports": "containerPort"}


def fail(message):
    sys.exit("kustomize-lite: " + message)


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def merge(base, patch, key=None):
    """Strategic merge of `patch` into `base` (dicts deep-merged, keyed lists merged by
    their key, other lists replaced)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        field = MERGE_KEYS[key]
        out = [copy.deepcopy(item) for item in base]
        for item in patch:
            match = next((i for i, b in enumerate(out) if b.get(field) == item.get(field)), None)
            if match is None:
                out.append(copy.deepcopy(item))
            else:
                out[match] = merge(out[match], item)
        return out
    return copy.deepcopy(patch)


def json6902(doc, operations):
    for op in operations:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].strip("/").split("/")]
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        if op["op"] not in ("replace", "add"):
            fail("JSON patch op %r is not supported" % op["op"])
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if op["op"] == "add":
                parent.insert(index, op["value"])
            else:
                parent[index] = op["value"]
        else:
            if op["op"] == "replace" and last not in parent:
                fail("replace of a missing path %s" % op["path"])
            parent[last] = op["value"]


def matches(doc, target):
    return all(doc.get(k) == v for k, v in (("kind", target.get("kind")),) if v) and (
        not target.get("name") or doc["metadata"]["name"] == target["name"]
    )


def build(directory):
    path = os.path.join(directory, "kustomization.yaml")
    with open(path) as f:
        k = yaml.safe_load(f)
    unknown = set(k) - KNOWN
    if unknown:
        fail("%s uses %s, which this renderer does not implement" % (path, sorted(unknown)))
    docs = []
    for resource in k.get("resources", []):
        target = os.path.join(directory, resource)
        docs += build(target) if os.path.isdir(target) else load_all(target)
    for generator in k.get("configMapGenerator", []):
        data = {}
        for entry in generator.get("files", []):
            name, _, source = entry.partition("=")
            source = source or name
            with open(os.path.join(directory, source)) as f:
                data[os.path.basename(name)] = f.read()
        behavior = generator.get("behavior", "create")
        existing = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == generator["name"]]
        if behavior == "replace":
            if not existing:
                fail("configMapGenerator %s replaces nothing" % generator["name"])
            existing[0]["data"] = data
        elif behavior == "create":
            docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data})
        else:
            fail("configMapGenerator behavior %r is not supported" % behavior)
    for patch in k.get("patches", []):
        if "path" in patch:
            for p in load_all(os.path.join(directory, patch["path"])):
                targets = [d for d in docs if d["kind"] == p["kind"] and d["metadata"]["name"] == p["metadata"]["name"]]
                if not targets:
                    fail("patch %s matches nothing" % patch["path"])
                for d in targets:
                    docs[docs.index(d)] = merge(d, p)
        else:
            operations = yaml.safe_load(patch["patch"])
            targets = [d for d in docs if matches(d, patch.get("target", {}))]
            if not targets:
                fail("patch on %s matches nothing" % patch.get("target"))
            for d in targets:
                json6902(d, operations)
    for image in k.get("images", []):
        for d in docs:
            spec = d.get("spec", {}).get("template", {}).get("spec", {})
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = "%s:%s" % (image.get("newName", name), image.get("newTag", tag or "latest"))
    for group in k.get("labels", []):
        if group.get("includeSelectors") or group.get("includeTemplates"):
            fail("labels with includeSelectors/includeTemplates are not supported")
        for d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(group["pairs"])
    if "namespace" in k:
        for d in docs:
            if d["kind"] != "Namespace":
                d["metadata"]["namespace"] = k["namespace"]
    return docs


if __name__ == "__main__":
    if len(sys.argv) != 2:
        fail("usage: kustomize-lite.py DIRECTORY")
    yaml.safe_dump_all(copy.deepcopy(build(sys.argv[1])), sys.stdout, sort_keys=False)
