#!/usr/bin/env python3
"""Fails unless every pod template in the given renders is in the Guaranteed QoS class:
every container and init container has cpu and memory requests equal to its limits (what
Kubernetes requires before the static CPU manager gives a pod whole cores).

    python3 tools/guaranteed.py renders/cpu.yaml
"""
import sys

import yaml


def templates(obj):
    spec = obj.get("spec", {})
    if obj.get("kind") == "LeaderWorkerSet":
        lwt = spec["leaderWorkerTemplate"]
        for name in ("leaderTemplate", "workerTemplate"):
            if name in lwt:
                yield name, lwt[name]["spec"]
    elif "template" in spec:
        yield "template", spec["template"]["spec"]


def main():
    bad = []
    for path in sys.argv[1:]:
        for obj in yaml.safe_load_all(open(path)):
            if not obj:
                continue
            for where, pod in templates(obj):
                for c in pod.get("initContainers", []) + pod.get("containers", []):
                    res = c.get("resources", {})
                    req, lim = res.get("requests", {}), res.get("limits", {})
                    for r in ("cpu", "memory"):
                        if r not in lim or str(req.get(r, lim[r])) != str(lim[r]):
                            bad.append(f"{path}: {obj['kind']}/{obj['metadata']['name']} {where} container {c['name']}: "
                                       f"{r} request {req.get(r)} != limit {lim.get(r)}")
    for b in bad:
        print(b, file=sys.stderr)
    if bad:
        sys.exit("not Guaranteed QoS: every container needs requests = limits")
    print(f"Guaranteed QoS: every pod template of {', '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
