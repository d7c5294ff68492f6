#!/usr/bin/env python3
"""Show that validate_manifests.py catches what it is there to catch; exit 1 if it does not.

Takes clean renders (the LeaderWorkerSet one and the StatefulSet one), checks that they
pass, then plants one mistake at a time in a copy (a typo'd field and a wrong type, in a
core object and in the LeaderWorkerSet, and the other mistakes the validator promises to
find) and requires each copy to fail with an error that names the mistake.

Usage: selftest.py --crd-schemas DIR --k8s-version V LWS_RENDER.yaml STS_RENDER.yaml
"""

import argparse
import copy
import os
import subprocess
import sys
import tempfile

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))


def find(docs, kind, name=None):
    for d in docs:
        if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name):
            return d
    raise SystemExit(f"selftest: the render has no {kind} {name or ''}")


def lwt(docs):
    return find(docs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]


# (what, which render, the mistake, a text the error must contain)
CASES = [
    ("a typo'd field in a core object (Service)", "lws",
     lambda d: find(d, "Service", "tpserve-api")["spec"]["ports"][0].update(targetPortt="http"), "targetPortt"),
    ("a wrong type in a core object (StatefulSet replicas)", "sts",
     lambda d: find(d, "StatefulSet", "tpserve-worker")["spec"].update(replicas="two"), "spec/replicas: 'two'"),
    ("a typo'd field in a core object's container (StatefulSet)", "sts",
     lambda d: find(d, "StatefulSet", "tpserve-worker")["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="Always"),
     "imagePullPolicyy"),
    ("a typo'd field in the LeaderWorkerSet", "lws",
     lambda d: lwt(d).update(sizee=2), "sizee"),
    ("a wrong type in the LeaderWorkerSet (size)", "lws",
     lambda d: lwt(d).update(size="two"), "leaderWorkerTemplate/size: 'two'"),
    ("a typo'd field in a LeaderWorkerSet container", "lws",
     lambda d: lwt(d)["workerTemplate"]["spec"]["containers"][0].update(imagee="tpserve"), "imagee"),
    ("a wrong type in a LeaderWorkerSet container (containerPort)", "lws",
     lambda d: lwt(d)["leaderTemplate"]["spec"]["containers"][0]["ports"][0].update(containerPort="8000"),
     "containerPort: '8000'"),
    ("a typo'd field in a LeaderWorkerSet template's metadata", "lws",
     lambda d: lwt(d)["leaderTemplate"]["metadata"].update(lables={"a": "b"}), "lables"),
    ("a typo'd field in the LeaderWorkerSet's own metadata", "lws",
     lambda d: find(d, "LeaderWorkerSet")["metadata"].update(lables={"a": "b"}), "lables"),
    ("a typo'd field in the ServiceMonitor", "lws",
     lambda d: find(d, "ServiceMonitor")["spec"]["endpoints"][0].update(intervall="15s"), "intervall"),
    ("a kind with no schema", "lws",
     lambda d: d.append({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}), "no schema for example.com/v1 Widget"),
    ("a group size that is not TPSERVE_TP x TPSERVE_PP", "lws",
     lambda d: lwt(d).update(size=3), "size 3 but the ConfigMap plans"),
    ("a worker StatefulSet whose replicas are not TPSERVE_TP x TPSERVE_PP", "sts",
     lambda d: find(d, "StatefulSet", "tpserve-worker")["spec"].update(replicas=3), "replicas 3 but the ConfigMap plans"),
    ("an argument naming an undefined $(VAR)", "lws",
     lambda d: lwt(d)["workerTemplate"]["spec"]["containers"][0]["args"].append("$(POD_IPP)"), "$(POD_IPP)"),
    ("a ConfigMap that the render does not have", "lws",
     lambda d: lwt(d)["workerTemplate"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"].update(name="tpserve-config"),
     "names ConfigMap 'tpserve-config'"),
    ("a probe on a port the container does not have", "lws",
     lambda d: lwt(d)["leaderTemplate"]["spec"]["containers"][0]["readinessProbe"]["httpGet"].update(port="htp"), "port 'htp'"),
]


def validate(args, path, external_secret=True):
    cmd = [sys.executable, os.path.join(HERE, "validate_manifests.py"), "--k8s-version", args.k8s_version, "--crd-schemas", args.crd_schemas]
    if external_secret:
        cmd += ["--external-secret", "tpserve-cluster-token"]
    p = subprocess.run(cmd + [path], capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crd-schemas", required=True)
    ap.add_argument("--k8s-version", required=True)
    ap.add_argument("lws_render")
    ap.add_argument("sts_render")
    args = ap.parse_args()
    clean = {}
    for key, path in (("lws", args.lws_render), ("sts", args.sts_render)):
        with open(path) as f:
            clean[key] = [d for d in yaml.safe_load_all(f) if d]
        rc, out = validate(args, path)
        if rc != 0:
            sys.exit(f"selftest: the clean render {path} does not pass, so nothing below would mean anything:\n{out}")

    missed = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = CASES + [("a Secret that is neither rendered nor external", "lws", lambda d: None, "names Secret 'tpserve-cluster-token'")]
        for i, (what, key, plant, needle) in enumerate(cases):
            docs = copy.deepcopy(clean[key])
            plant(docs)
            path = os.path.join(tmp, f"case{i}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump_all(docs, f, sort_keys=False)
            rc, out = validate(args, path, external_secret=not what.startswith("a Secret"))
            errors = [line for line in out.splitlines() if line.startswith("ERROR")]
            caught = rc != 0 and any(needle in line for line in errors)
            print(f"{'caught' if caught else 'MISSED'}: {what}" + (f"\n    {next(line for line in errors if needle in line)}" if caught else ""))
            if not caught:
                missed.append(f"{what}: exit {rc}, no ERROR line containing {needle!r}:\n{out}")
    if missed:
        sys.exit("selftest: the validator let these through:\n" + "\n".join(missed))
    print(f"selftest: all {len(cases)} planted mistakes caught")


if __name__ == "__main__":
    main()
