"""Validates the YAML syntax of every deploy file (no container engine runs
in CI, so the files are checked, not run). Exit 1 naming the bad file."""
import pathlib
import sys

import yaml

bad = 0
root = pathlib.Path(__file__).parent
for path in sorted(root.rglob("*.y*ml")):
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        if not docs:
            raise ValueError("no document")
        for d in docs:
            if path.parent.name == "k8s" and not {"apiVersion", "kind", "metadata"} <= set(d):
                raise ValueError("a Kubernetes object needs apiVersion, kind and metadata")
            if d.get("kind") == "CronJob" and d.get("spec", {}).get("timeZone") != "Asia/Seoul":
                # Schedules are the operators' local time (Korea), not the node's.
                raise ValueError(f"CronJob {d['metadata'].get('name')}: spec.timeZone must be Asia/Seoul")
        print(f"ok   {path.relative_to(root)} ({len(docs)} document(s))")
    except Exception as e:  # noqa: BLE001 - report every failure the same way
        bad += 1
        print(f"FAIL {path.relative_to(root)}: {e}")
sys.exit(1 if bad else 0)
