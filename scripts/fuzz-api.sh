#!/usr/bin/env bash
# Fuzzes the merchant API from its own OpenAPI document with schemathesis
# (installed from PyPI into target/schemathesis-venv on first use).
# Checks: no 5xx answer, every documented answer has its documented content
# type and schema (errors are application/problem+json).
#
#   scripts/fuzz-api.sh          # 100 examples per operation
#   scripts/fuzz-api.sh 20       # a short pass (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
EXAMPLES=${1:-100}
VENV=target/schemathesis-venv
if [ ! -x "$VENV/bin/schemathesis" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet schemathesis
fi
cargo build -q -p paygate
BIN=target/debug/paygate
WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export PAYGATE_DATABASE_URL="sqlite://$WORK/fuzz.db"
export PAYGATE_LISTEN="127.0.0.1:$PORT"
export PAYGATE_INBOUND_RATE_LIMIT_PER_SECOND=0
export RUST_LOG=warn
KEY=$("$BIN" merchants create fuzz | awk '/^api_key:/ {print $2}')
"$BIN" serve >"$WORK/serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
"$VENV/bin/schemathesis" run "http://127.0.0.1:$PORT/openapi.json" \
  --header "Authorization: Bearer $KEY" \
  --checks not_a_server_error,content_type_conformance,response_schema_conformance \
  --max-examples "$EXAMPLES" \
  --seed 42
