#!/usr/bin/env bash
# Latency of an unrelated request (GET /v1/models) while 4 clients send 2 MB prompts and hang up
# before the answer's usage arrives: each such request makes the gateway count the prompt's
# tokens itself. Before bounded counting that ran the tokenizer over the whole 2 MB on the
# worker thread and stalled every other request on it.
#
# Usage: bash benches/big_prompts.sh [binary] [requests]
#   binary    the komilion binary to measure (default target/release/komilion, built if missing)
#   requests  GET /v1/models samples per phase (default 200)
# Prints p50/p90/p99/max of the unrelated request, idle and under the big-prompt load, and how
# many big prompts were sent. One worker thread (`threads: 1`): the worst case for a stall.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/komilion}
SAMPLES=${2:-200}
[ -x "$BIN" ] || cargo build --release -q
DIR=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf $DIR' EXIT
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
MOCK_PORT=$(free_port); GW_PORT=$(free_port); METRICS_PORT=$(free_port)
PROVIDER_KEY=sk-bench-provider-key
CLIENT_KEY=sk-kml-bench-client-key-0123456789

# A provider that streams slowly, so the clients hang up before its usage chunk.
$BIN mock-provider --port $MOCK_PORT --api-key $PROVIDER_KEY --threads 1 \
  --behavior '{"chunk_delay_ms": 200, "chunks": 20}' 2>/dev/null &
cat > $DIR/komilion.yaml <<YAML
server: {threads: 1, work_stealing: false, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1, pid_file: $DIR/k.pid, upgrade_sock: $DIR/k.sock}
listen: {gateway: ["127.0.0.1:$GW_PORT"], metrics: "127.0.0.1:$METRICS_PORT"}
limits: {max_body_bytes: 4194304}
providers:
  - {name: sim, kind: openai, base_url: "http://127.0.0.1:$MOCK_PORT/v1", api_key: $PROVIDER_KEY, models: [gpt-4o-mini]}
plugins:
  - name: static_key_auth
    settings: {keys: [{name: bench, key: "$CLIENT_KEY"}]}
YAML
RUST_LOG=error $BIN serve -c $DIR/komilion.yaml &
for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:$METRICS_PORT/health && break; sleep 0.1; done

# 2 MB of prose-like text without spaces in long runs, the tokenizer's slow case.
python3 - "$DIR/big.json" <<'PY'
import json, sys
text = ("Lorem" + "x" * 995 + " ") * 2000
json.dump({"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": text}]}, open(sys.argv[1], "w"))
PY

measure() {
  : > $DIR/lat
  for _ in $(seq "$SAMPLES"); do
    curl -s -o /dev/null -w '%{time_total}\n' -H "authorization: Bearer $CLIENT_KEY" \
      http://127.0.0.1:$GW_PORT/v1/models >> $DIR/lat
  done
  python3 - "$1" $DIR/lat <<'PY'
import sys
xs = sorted(float(l) * 1000 for l in open(sys.argv[2]) if l.strip())
q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]
print(f"{sys.argv[1]:<28} n={len(xs)}  p50 {q(.5):8.2f} ms  p90 {q(.9):8.2f} ms  p99 {q(.99):8.2f} ms  max {xs[-1]:8.2f} ms")
PY
}

echo "binary: $BIN ($($BIN --version 2>/dev/null || echo komilion))"
measure "idle"
: > $DIR/sent
for c in 1 2 3 4; do
  ( while true; do
      curl -s -o /dev/null --max-time 0.3 -H "authorization: Bearer $CLIENT_KEY" \
        -H 'content-type: application/json' --data-binary @$DIR/big.json \
        http://127.0.0.1:$GW_PORT/v1/chat/completions || true
      echo >> $DIR/sent
    done ) &
done
sleep 1
measure "4 clients x 2 MB prompts"
echo "big prompts sent: $(wc -l < $DIR/sent)"
