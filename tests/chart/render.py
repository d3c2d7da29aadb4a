#!/usr/bin/env python3
"""Lint, render and schema-check the Helm chart with Helm's own Go SDK (helm-python-sdk).

    render.py CHART --release NAME --namespace NS [--values FILE|-] [--kubeconfig PATH]

1. `helm lint --strict` with the values (warnings fail too; the chart's values.schema.json is
   checked as part of it).
2. Offline render (`helm template`), every object validated with kubernetes-validate against
   the oldest Kubernetes schema it ships (the nearest to the 1.20 test apiserver) and the
   newest, in strict mode (unknown fields fail). Kinds backed by CRDs have no schema there:
   their metadata is checked against ObjectMeta, and ServiceMonitor's spec against the subset
   of the monitoring.coreos.com/v1 schema below; other custom kinds get the metadata check only
   (reported on stderr).
3. With --kubeconfig, the chart is rendered again the way `helm install --dry-run=server`
   does against that cluster (its real version and API groups), and THOSE manifests are the
   output: they are what an install there would create (like a real install, the dry run
   refuses when objects of the release already exist there without Helm's ownership
   annotations, so render before applying). Objects in an API version that no
   shipped schema has any more (policy/v1beta1 on a 1.20 cluster) are left to the API server
   to check when they are applied.

The objects are written to stdout as one JSON array. Any failure exits 1 with a message that
names the template, the object and the reason.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv
from referencing import Registry, Resource

# Helm lint severities: 0 unknown, 1 info, 2 warning, 3 error. --strict fails on warnings.
LINT_WARNING = 2

# Prometheus Operator durations (monitoring.coreos.com/v1 Duration).
PROM_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"type": "string"},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
# The fields of ServiceMonitor the chart may set, with their CRD types; anything else in spec
# or in an endpoint fails, so a typo cannot hide here either.
SERVICE_MONITOR_SPEC = {
    "type": "object",
    "required": ["selector"],
    "additionalProperties": False,
    "properties": {
        "jobLabel": {"type": "string"},
        "targetLabels": {"type": "array", "items": {"type": "string"}},
        "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "sampleLimit": {"type": "integer", "minimum": 0},
        "selector": LABEL_SELECTOR,
        "namespaceSelector": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "any": {"type": "boolean"},
                "matchNames": {"type": "array", "items": {"type": "string"}},
            },
        },
        "endpoints": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "port": {"type": "string"},
                    "targetPort": {"type": ["string", "integer"]},
                    "path": {"type": "string"},
                    "scheme": {"type": "string", "enum": ["http", "https"]},
                    "interval": {"type": "string", "pattern": PROM_DURATION},
                    "scrapeTimeout": {"type": "string", "pattern": PROM_DURATION},
                    "honorLabels": {"type": "boolean"},
                    "honorTimestamps": {"type": "boolean"},
                    "params": {"type": "object"},
                    "relabelings": {"type": "array", "items": {"type": "object"}},
                    "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                    "tlsConfig": {"type": "object"},
                },
            },
        },
    },
}
CUSTOM_SPECS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SPEC}


class Failure(Exception):
    pass


def load_values(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise Failure(f"values from {path} are not a mapping")
    return values


def lint(chart: str, values: dict[str, Any], namespace: str) -> None:
    report = helm.lint(chart, values, strict=True, namespace=namespace)
    problems = [
        f"[{m['path']}] {m['error']}" for m in report["messages"] if m["severity"] >= LINT_WARNING
    ]
    problems += report.get("errors") or []
    if problems:
        # The SDK reports a schema failure several times over; each line once is enough.
        lines = dict.fromkeys(l.strip() for p in problems for l in p.splitlines() if l.strip())
        raise Failure("helm lint --strict failed:\n  " + "\n  ".join(lines))


def objects_of(manifests: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(template, object) for every non-empty YAML document of the rendered templates."""
    out = []
    for template, text in sorted(manifests.items()):
        if not template.endswith((".yaml", ".yml")):
            continue  # NOTES.txt and the like
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as e:
            raise Failure(f"{template} does not render to valid YAML: {e}") from e
        for doc in docs:
            if doc is None:
                continue
            if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
                raise Failure(f"{template} renders a document that is not an object: {doc!r:.200}")
            out.append((template, doc))
    return out


def split_manifest(manifest: str) -> dict[str, str]:
    """A release manifest (documents headed by `# Source: <template>`) by template."""
    by_template: dict[str, str] = {}
    for doc in re.split(r"^---\s*$", manifest, flags=re.M):
        match = re.search(r"^# Source: (.+)$", doc, flags=re.M)
        if match and doc.strip():
            name = match.group(1).strip()
            by_template[name] = by_template.get(name, "") + "\n---\n" + doc
    return by_template


def name_of(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{obj['kind']} {ns + '/' if ns else ''}{meta.get('name')}"


def check_object_meta(meta: Any, version: str) -> None:
    """Validates `meta` against ObjectMeta of the shipped `version` (strict)."""
    defs = kv.schema_contents(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version
    )
    registry = Resource.from_contents(defs) @ Registry()
    schema = {"$ref": f"{defs['$id']}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    jsonschema.Draft202012Validator(schema, registry=registry).validate(meta)


def validate(template: str, obj: dict[str, Any], versions: list[str], notes: list[str]) -> None:
    key = (obj["apiVersion"], obj["kind"])
    known_somewhere = False
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
            known_somewhere = True
        except kv.SchemaNotFoundError:
            continue
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(top)"
            raise Failure(
                f"{template}: {name_of(obj)} does not validate against Kubernetes {e.version} "
                f"(strict): at {path}: {e.message}"
            ) from e
    if known_somewhere:
        return
    # No built-in schema: a custom resource, or a built-in API version no shipped schema has.
    try:
        check_object_meta(obj.get("metadata"), versions[-1])
        if key in CUSTOM_SPECS:
            jsonschema.validate(obj.get("spec"), CUSTOM_SPECS[key])
    except jsonschema.ValidationError as e:
        path = ".".join(str(p) for p in e.path) or "(top)"
        raise Failure(f"{template}: {name_of(obj)}: at {path}: {e.message}") from e
    if key in CUSTOM_SPECS:
        notes.append(f"{name_of(obj)}: metadata and the chart's spec fields checked (CRD subset)")
    else:
        notes.append(
            f"{name_of(obj)}: no schema for {obj['apiVersion']} in kubernetes-validate "
            f"{versions[0]}..{versions[-1]}; metadata checked, the rest is the API server's"
        )


def render_offline(chart: helm.Chart, values: dict[str, Any], release: str, namespace: str):
    return chart.render(values, name=release, namespace=namespace, is_install=True)


def render_for_cluster(
    chart: helm.Chart, values: dict[str, Any], release: str, namespace: str, kubeconfig: str
) -> dict[str, str]:
    with helm.Config(kubeconfig_path=kubeconfig, namespace=namespace) as config:
        release_info = config.install(
            chart, release, values, namespace=namespace, dry_run="server"
        )
    manifest = release_info.get("manifest") if isinstance(release_info, dict) else None
    if not manifest:
        raise Failure(f"the server dry run returned no manifest: {release_info!r:.500}")
    return split_manifest(manifest)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chart")
    parser.add_argument("--release", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--values", help="a YAML or JSON file, or - for stdin")
    parser.add_argument("--kubeconfig", help="render for this cluster (server dry run)")
    args = parser.parse_args()

    shipped = kv.all_versions()
    # The oldest shipped is the nearest to the test apiserver (1.20); the newest is current.
    versions = list(dict.fromkeys([shipped[0], shipped[-1]]))
    notes: list[str] = []
    try:
        values = load_values(args.values)
        lint(args.chart, values, args.namespace)
        with helm.Chart.load(args.chart) as chart:
            try:
                manifests = render_offline(chart, values, args.release, args.namespace)
            except helm.HelmError as e:
                raise Failure(f"helm template failed: {e}") from e
            for template, obj in objects_of(manifests):
                validate(template, obj, versions, notes)
            if args.kubeconfig:
                try:
                    manifests = render_for_cluster(
                        chart, values, args.release, args.namespace, args.kubeconfig
                    )
                except helm.HelmError as e:
                    raise Failure(f"helm install --dry-run=server failed: {e}") from e
        objects = objects_of(manifests)
        if args.kubeconfig:
            for template, obj in objects:
                validate(template, obj, versions, notes)
    except Failure as e:
        print(f"render.py: {e}", file=sys.stderr)
        return 1
    for note in dict.fromkeys(notes):
        print(f"render.py: note: {note}", file=sys.stderr)
    json.dump([obj for _, obj in objects], sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
