#!/usr/bin/env python3
"""Validate rendered (multi-document) manifests offline; exit 1 on any error.

Schemas: a kind with a strict CRD schema (crd2jsonschema.py's output, --crd-schemas) is
checked against it; every other kind against kubernetes-validate's strict schemas for
--k8s-version (unknown fields rejected). A kind with neither is an ERROR, not the warning
kubernetes-validate gives it (it exits 0 there).

Then what no schema says but tpserve's pods need (each an ERROR):
  - every ConfigMap and PersistentVolumeClaim a pod names exists in the render, and every
    Secret too, except those given with --external-secret (made by the user, never
    committed);
  - a probe's named port is one of its container's ports;
  - each `$(VAR)` in a command, argument or env value is defined before it (Kubernetes leaves
    an unknown one as the literal text): env, the ConfigMaps of envFrom, or the LWS_*
    variables the LeaderWorkerSet controller adds;
  - the ranks the pods provide equal TPSERVE_TP x TPSERVE_PP of their ConfigMap: a
    LeaderWorkerSet's `size` (its leader holds a rank), a worker StatefulSet's `replicas`.

Usage: validate_manifests.py --k8s-version 1.32.0 --crd-schemas DIR [--external-secret NAME].. FILE..
"""

import argparse
import json
import os
import re
import sys

import jsonschema
import yaml
from kubernetes_validate import utils as kv
from referencing import Registry, Resource

LWS_VARS = {"LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX"}


def schema_registry(version):
    """kubernetes-validate's strict `_definitions.json`, registered under its `$id`."""
    version = [v for v in kv.all_versions() if kv.major_minor(v) <= kv.major_minor(version)][-1]
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    defs = kv.schema_contents(f"{folder}/_definitions.json", version)
    return folder, version, Resource.from_contents(defs) @ Registry()


def core_schema(folder, version, doc):
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])
    try:
        return kv.schema_contents(f"{folder}/{doc['kind'].lower()}-{api}.json", version)
    except FileNotFoundError:
        return None


def where(doc):
    return f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"


def path_of(error):
    return "/".join(str(p) for p in error.absolute_path) or "(top)"


def pod_templates(doc):
    """(label, pod spec, is_lws) for every pod template in an object."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "LeaderWorkerSet":
        lwt = spec.get("leaderWorkerTemplate") or {}
        for role in ("leaderTemplate", "workerTemplate"):
            if lwt.get(role):
                yield role, (lwt[role].get("spec") or {}), True
    elif kind in ("StatefulSet", "Deployment", "DaemonSet", "ReplicaSet", "Job"):
        yield "template", ((spec.get("template") or {}).get("spec") or {}), False
    elif kind == "Pod":
        yield "spec", spec, False


def config_of(pod, configmaps):
    """The merged data of the ConfigMaps a pod's first container reads with envFrom."""
    data = {}
    for c in pod.get("containers") or []:
        for src in c.get("envFrom") or []:
            data.update(configmaps.get((src.get("configMapRef") or {}).get("name"), {}))
        break
    return data


def semantic_errors(docs, external_secrets):
    errors = []
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in docs if d.get("kind") == "ConfigMap"}
    secrets = {d["metadata"]["name"] for d in docs if d.get("kind") == "Secret"} | set(external_secrets)
    claims = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    for doc in docs:
        for role, pod, is_lws in pod_templates(doc):
            at = f"{where(doc)} {role}"
            for v in pod.get("volumes") or []:
                if "configMap" in v and v["configMap"].get("name") not in configmaps:
                    errors.append(f"{at}: volume {v['name']} names ConfigMap {v['configMap'].get('name')!r}, which the render does not have")
                if "persistentVolumeClaim" in v and v["persistentVolumeClaim"].get("claimName") not in claims:
                    errors.append(f"{at}: volume {v['name']} names PersistentVolumeClaim {v['persistentVolumeClaim'].get('claimName')!r}, which the render does not have")
                if "secret" in v and v["secret"].get("secretName") not in secrets:
                    errors.append(f"{at}: volume {v['name']} names Secret {v['secret'].get('secretName')!r}, which is neither rendered nor --external-secret")
            for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
                cat = f"{at} container {c.get('name')}"
                defined = set(LWS_VARS) if is_lws else set()
                for src in c.get("envFrom") or []:
                    name = (src.get("configMapRef") or {}).get("name")
                    if name is not None and name not in configmaps:
                        errors.append(f"{cat}: envFrom names ConfigMap {name!r}, which the render does not have")
                    defined |= set(configmaps.get(name, {}))
                for e in c.get("env") or []:
                    for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(e.get("value", ""))):
                        if var not in defined:
                            errors.append(f"{cat}: env {e['name']} uses $({var}), not defined before it")
                    defined.add(e["name"])
                for field in ("command", "args"):
                    for arg in c.get(field) or []:
                        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(arg)):
                            if var not in defined:
                                errors.append(f"{cat}: {field} {arg!r} uses $({var}), which is not defined (Kubernetes would pass it literally)")
                ports = {p.get("name") for p in c.get("ports") or []}
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    for handler in ("httpGet", "tcpSocket", "grpc"):
                        port = ((c.get(probe) or {}).get(handler) or {}).get("port")
                        if isinstance(port, str) and port not in ports:
                            errors.append(f"{cat}: {probe} uses port {port!r}, not one of its ports {sorted(p for p in ports if p)}")
        ranks = None
        if doc.get("kind") == "LeaderWorkerSet":
            ranks = ("size", ((doc.get("spec") or {}).get("leaderWorkerTemplate") or {}).get("size"))
            pod = next((p for r, p, _ in pod_templates(doc) if r == "workerTemplate"), {})
        elif doc.get("kind") == "StatefulSet" and (doc["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "worker":
            ranks = ("replicas", (doc.get("spec") or {}).get("replicas"))
            pod = next((p for _, p, _ in pod_templates(doc)), {})
        if ranks:
            cfg = config_of(pod, configmaps)
            try:
                world = int(cfg.get("TPSERVE_TP", "1")) * int(cfg.get("TPSERVE_PP", "1"))
            except ValueError:
                errors.append(f"{where(doc)}: TPSERVE_TP/TPSERVE_PP are not integers: {cfg.get('TPSERVE_TP')!r} {cfg.get('TPSERVE_PP')!r}")
                continue
            if ranks[1] != world:
                errors.append(f"{where(doc)}: {ranks[0]} {ranks[1]!r} but the ConfigMap plans TPSERVE_TP x TPSERVE_PP = {world} ranks")
    return errors


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k8s-version", required=True)
    ap.add_argument("--crd-schemas", required=True)
    ap.add_argument("--external-secret", action="append", default=[])
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()

    folder, version, registry = schema_registry(args.k8s_version)
    crd = {}
    for name in os.listdir(args.crd_schemas):
        with open(os.path.join(args.crd_schemas, name)) as f:
            s = json.load(f)
        crd[(s["properties"]["apiVersion"]["enum"][0], s["properties"]["kind"]["enum"][0])] = s

    failed = 0
    for path in args.files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        errors = []
        for doc in docs:
            if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
                errors.append(f"a document without apiVersion/kind: {str(doc)[:80]}")
                continue
            schema = crd.get((doc["apiVersion"], doc["kind"])) or core_schema(folder, version, doc)
            if schema is None:
                errors.append(f"{where(doc)}: no schema for {doc['apiVersion']} {doc['kind']} (not a Kubernetes {version} kind, nor a CRD in {args.crd_schemas})")
                continue
            validator = jsonschema.Draft202012Validator(schema, registry=registry)
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
                errors.append(f"{where(doc)}: {path_of(e)}: {e.message}")
        errors += semantic_errors([d for d in docs if isinstance(d, dict) and "kind" in d], args.external_secret)
        for e in errors:
            print(f"ERROR {path}: {e}")
        print(f"{path}: {len(docs)} objects, {len(errors)} errors (Kubernetes {version} strict schemas)")
        failed += bool(errors)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
