#!/usr/bin/env python3
"""Prints every PromQL expression of the dashboard (deploywatch.json beside this script, or the
file given), one per line, with Grafana variables replaced so the expressions parse as plain
PromQL. With --rules-file OUT it writes them as recording rules, so `promtool check rules OUT`
proves each one parses."""
import json
import os
import sys

# The dashboard next to this script, so it runs from any directory.
DASHBOARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deploywatch.json")

def expressions(path):
    dashboard = json.load(open(path))
    found = []
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append(target["expr"])
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            found.append(annotation["expr"])
    return [e.replace("$target", ".*").replace("${datasource}", "") for e in found]

def main():
    args = sys.argv[1:]
    path = args[0] if args and not args[0].startswith("--") else DASHBOARD
    exprs = expressions(path)
    if "--rules-file" in args:
        out = args[args.index("--rules-file") + 1]
        with open(out, "w") as f:
            f.write("groups:\n  - name: dashboard\n    rules:\n")
            for i, e in enumerate(exprs):
                f.write(f"      - record: dashboard:expr_{i}\n        expr: {json.dumps(e)}\n")
    for e in exprs:
        print(e)

if __name__ == "__main__":
    main()
