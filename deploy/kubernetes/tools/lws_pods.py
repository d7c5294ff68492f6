#!/usr/bin/env python3
"""Print the pod templates of every LeaderWorkerSet in a render as Pods, for checkov.

checkov does not look inside custom resources, so the LeaderWorkerSet's leader and worker
templates would go unlinted; as Pods (same metadata, same spec, the LeaderWorkerSet's
namespace) every container check applies to them.

Usage: lws_pods.py RENDER.yaml PODS.yaml   (writes PODS.yaml only if the render has one)
"""

import sys

import yaml


def pods(docs):
    for doc in docs:
        if not doc or doc.get("kind") != "LeaderWorkerSet":
            continue
        meta = doc["metadata"]
        lwt = doc["spec"]["leaderWorkerTemplate"]
        for role in ("leaderTemplate", "workerTemplate"):
            template = lwt.get(role)
            if not template:
                continue
            tmeta = template.get("metadata") or {}
            yield {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{meta['name']}-{role.removesuffix('Template')}",
                    "namespace": meta.get("namespace", "default"),
                    "labels": tmeta.get("labels", {}),
                    "annotations": tmeta.get("annotations", {}),
                },
                "spec": template["spec"],
            }


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        out = list(pods(yaml.safe_load_all(f)))
    if out:
        with open(sys.argv[2], "w") as f:
            yaml.safe_dump_all(out, f, sort_keys=False)
        print(f"{sys.argv[1]}: {len(out)} pod templates -> {sys.argv[2]}")


if __name__ == "__main__":
    main()
