#!/usr/bin/env bash
# Checks the monitoring files: the Prometheus alert rules (syntax, then their
# unit tests), the scrape configuration, and every PromQL expression of the
# Grafana dashboard (compiled by promtool as recording rules). Installs
# promtool from Debian's `prometheus` package when it is missing.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v promtool >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
promtool check rules prometheus/alerts.yml
promtool test rules prometheus/alerts.test.yml
promtool check config prometheus/prometheus.yml
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - grafana/paygate.json "$tmp/dashboard.rules.yml" <<'PY'
import json, sys
dash = json.load(open(sys.argv[1]))
rules, seen = [], set()
for p in dash["panels"]:
    assert p.get("title") and p.get("gridPos"), f"panel {p.get('id')} lacks a title or a place"
    assert p["id"] not in seen, f"panel id {p['id']} twice"
    seen.add(p["id"])
    for t in p["targets"]:
        assert "paygate_" in t["expr"], f"{p['title']}: not a paygate metric: {t['expr']}"
        rules.append({"record": f"dashboard:panel{p['id']}:{t['refId']}", "expr": t["expr"]})
json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
print(f"ok   grafana/paygate.json: {len(dash['panels'])} panels, {len(rules)} queries")
PY
promtool check rules "$tmp/dashboard.rules.yml"
