#!/usr/bin/env python3
"""Real Helm actions on a cluster with Helm's own Go SDK (helm-python-sdk), as `helm` runs them.

    helm.py install|upgrade CHART --release NAME --namespace NS --kubeconfig PATH [--values FILE|-]
    helm.py uninstall --release NAME --namespace NS --kubeconfig PATH

install and upgrade print the objects of the release's manifest as one JSON array (what Helm
applied); uninstall prints Helm's answer (its `info` names what the resource policy kept). No
--wait: no controller runs the test cluster's pods.
Any failure exits 1 with Helm's message. tests/chart/render.py lints and validates the chart;
this only drives the release.
"""

from __future__ import annotations

import argparse
import json
import sys

import helm_python as helm

from render import Failure, load_values, objects_of, split_manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["install", "upgrade", "uninstall"])
    parser.add_argument("chart", nargs="?")
    parser.add_argument("--release", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--values", help="a YAML or JSON file, or - for stdin")
    args = parser.parse_args()
    try:
        with helm.Config(kubeconfig_path=args.kubeconfig, namespace=args.namespace) as config:
            if args.action == "uninstall":
                response = config.uninstall(args.release)
                json.dump(response, sys.stdout, default=str)
                sys.stdout.write("\n")
                return 0
            if not args.chart:
                raise Failure(f"{args.action} needs a chart")
            values = load_values(args.values)
            with helm.Chart.load(args.chart) as chart:
                act = config.install if args.action == "install" else config.upgrade
                release = act(chart, args.release, values, namespace=args.namespace)
        manifest = release.get("manifest") if isinstance(release, dict) else None
        if not manifest:
            raise Failure(f"{args.action} returned no manifest: {release!r:.500}")
        json.dump([obj for _, obj in objects_of(split_manifest(manifest))], sys.stdout)
        sys.stdout.write("\n")
        return 0
    except (Failure, helm.HelmError) as e:
        print(f"helm.py {args.action}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
