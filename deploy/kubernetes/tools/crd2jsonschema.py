#!/usr/bin/env python3
"""Turn CRDs' openAPIV3Schema into strict JSON schemas, one file per served version.

A CRD's schema lets unknown fields through (JSON Schema allows extra properties unless told
otherwise), while the API server prunes them or, with strict field validation, rejects
them. So every object schema gets `additionalProperties: false`, except where the CRD says
`x-kubernetes-preserve-unknown-fields` or gives `additionalProperties` itself; OpenAPI's
`nullable` becomes a "null" type; and the top-level `metadata` (a bare `type: object` in a
CRD) points at the real ObjectMeta schema that kubernetes-validate bundles, so a typo in
`metadata` fails too. `apiVersion` and `kind` are pinned to the CRD's.

Usage: crd2jsonschema.py OUT_DIR CRD.yaml...   (writes OUT_DIR/<kind>-<group>-<version>.json)
"""

import json
import os
import sys

import yaml

# The `$id` of kubernetes-validate's `_definitions.json` (validate_manifests.py registers it).
OBJECT_META = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def strict(node):
    """A copy of an OpenAPI v3 schema node made strict, recursively."""
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions", "$defs"):
            out[key] = {name: strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = strict(value)
        else:
            out[key] = value
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else out["type"] + ["null"]
    is_object = out.get("type") == "object" or (isinstance(out.get("type"), list) and "object" in out["type"])
    if is_object and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def convert(crd):
    spec = crd["spec"]
    group, kind = spec["group"], spec["names"]["kind"]
    for version in spec["versions"]:
        if not version.get("served", True):
            continue
        schema = strict(version["schema"]["openAPIV3Schema"])
        props = schema.setdefault("properties", {})
        props["apiVersion"] = {"type": "string", "enum": [f"{group}/{version['name']}"]}
        props["kind"] = {"type": "string", "enum": [kind]}
        props["metadata"] = {"$ref": OBJECT_META}
        schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        yield f"{kind.lower()}-{group}-{version['name']}.json", schema


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    for path in sys.argv[2:]:
        with open(path) as f:
            for crd in yaml.safe_load_all(f):
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue
                for name, schema in convert(crd):
                    with open(os.path.join(out_dir, name), "w") as out:
                        json.dump(schema, out)
                    print(f"{path} -> {name}")


if __name__ == "__main__":
    main()
