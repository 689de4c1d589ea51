#!/usr/bin/env bash
# User-space instructions per proxied request in the gateway, counted by valgrind's callgrind:
# the same count whatever else the machine is doing, so two binaries compare on a noisy box.
#
#   bash benches/callgrind.sh [BINARY] [KIND]
#
# BINARY defaults to target/release/komilion (built if missing); KIND is `json` (default) or
# `stream`; MODEL (default gpt-4o-mini, spliced) may name claude-sonnet-4-5 or gemini-2.5-flash
# to count a translated request. The gateway (static key, no store) runs under callgrind in front of the simulated
# provider, once serving FEW requests and once MANY; the difference divided by MANY - FEW is
# the cost of one request, start-up and shutdown cancelled out. Prints one line:
#   instructions_per_request=<n> kind=<kind> binary=<path>
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/komilion}
KIND=${2:-json}
FEW=${FEW:-20}
MANY=${MANY:-220}
MODEL=${MODEL:-gpt-4o-mini}
command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is required" >&2; exit 1; }
[ -x "$BIN" ] || cargo build --release --quiet
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOCK_PORT=$(free_port)
"$BIN" mock-provider --port "$MOCK_PORT" >/dev/null 2>&1 &
STREAM=false
[ "$KIND" = stream ] && STREAM=true
BODY="{\"model\":\"$MODEL\",\"stream\":$STREAM,\"messages\":[{\"role\":\"user\",\"content\":\"Say hello to the benchmark.\"}]}"

# The provider entry serving $MODEL in its own format (OpenAI's is spliced, the others translated).
provider() {
  case "$MODEL" in
    claude-*) echo "  - {name: claude, kind: anthropic, base_url: \"http://127.0.0.1:$MOCK_PORT/v1\", api_key: sk-bench-provider-key, models: [$MODEL]}" ;;
    gemini-*) echo "  - {name: google, kind: gemini, base_url: \"http://127.0.0.1:$MOCK_PORT/v1beta\", api_key: sk-bench-provider-key, models: [$MODEL]}" ;;
    *) echo "  - {name: sim, kind: openai, base_url: \"http://127.0.0.1:$MOCK_PORT/v1\", api_key: sk-bench-provider-key, models: [$MODEL]}" ;;
  esac
}

# Runs the gateway under callgrind for $1 requests; prints its total instruction count.
count() {
  local n=$1 port metrics out
  port=$(free_port)
  metrics=$(free_port)
  cat >"$WORK/k.yaml" <<YAML
server: {threads: 1, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1, pid_file: $WORK/k.pid, upgrade_sock: $WORK/k.sock}
listen: {gateway: ["127.0.0.1:$port"], metrics: "127.0.0.1:$metrics"}
providers:
$(provider)
plugins:
  - name: static_key_auth
    settings: {keys: [{name: bench, key: sk-bench-client-key-0123456789, account: bench}]}
YAML
  out="$WORK/callgrind.$n"
  RUST_LOG=error valgrind --tool=callgrind --callgrind-out-file="$out" "$BIN" serve -c "$WORK/k.yaml" >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$metrics/health" >/dev/null 2>&1 && break
    sleep 0.1
  done
  for _ in $(seq 1 "$n"); do
    curl -s -o /dev/null -H "Authorization: Bearer sk-bench-client-key-0123456789" \
      -H 'content-type: application/json' -d "$BODY" "http://127.0.0.1:$port/v1/chat/completions"
  done
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  grep -h '^summary:\|^totals:' "$out"* | head -1 | awk '{print $2}'
}

few=$(count "$FEW")
many=$(count "$MANY")
echo "instructions_per_request=$(((many - few) / (MANY - FEW))) kind=$KIND binary=$BIN"
