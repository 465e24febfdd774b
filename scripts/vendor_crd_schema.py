"""Vendor the part of a CRD's OpenAPI v3 schema that offline tests check manifests against.

    python scripts/vendor_crd_schema.py CRD.yaml OUT.json --source "<repo>@<tag> <commit> <path>"

From the CRD's (single) served version it keeps ``spec`` and drops ``status`` and every
``description``; it replaces each embedded PodTemplateSpec (a property named ``template`` with
``metadata`` and ``spec``) by ``{"type": "object"}`` (kubernetes-validate checks those against
the core API schemas of each Kubernetes version instead), and the HorizontalPodAutoscaler
``metrics`` list by a list of objects; and it sets ``additionalProperties: false`` on every object
that lists its properties, so a misspelt field fails as ``kubectl apply --validate=strict`` would
(the API server prunes unknown fields of a structural schema; strict validation reports them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

_DROP = ("description", "x-kubernetes-validations")


def _subset(node: Any, name: str = "") -> Any:
    if isinstance(node, list):
        return [_subset(item) for item in node]
    if not isinstance(node, dict):
        return node
    properties = node.get("properties", {})
    if name == "template" and {"metadata", "spec"} <= set(properties):
        return {"type": "object", "$comment": "core/v1 PodTemplateSpec: see kubernetes-validate"}
    if name == "metrics" and node.get("type") == "array":
        return {"type": "array", "items": {"type": "object"}}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {prop: _subset(schema, prop) for prop, schema in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _subset(value)
        else:
            out[key] = _subset(value)
    if node.get("type") == "object" and properties and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


def vendor(crd: dict[str, Any], source: str) -> dict[str, Any]:
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served", True)]
    schema = version["schema"]["openAPIV3Schema"]
    properties = {k: v for k, v in schema["properties"].items() if k != "status"}
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": f"{group}/{version['name']} {kind}, subset of the CRD from {source} "
        "(scripts/vendor_crd_schema.py)",
        **_subset({**schema, "properties": properties}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crd", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", required=True, help="where the CRD came from (repo@tag path)")
    args = parser.parse_args()
    crd = yaml.safe_load(args.crd.read_text())
    args.out.write_text(json.dumps(vendor(crd, args.source), indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
