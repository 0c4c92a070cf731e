#!/usr/bin/env bash
# Benchmark: the coordinator under a simulated fleet (performance issue,
# scenario 1, steady state). Starts a release `turnout serve` with a 10 s
# report interval, then `turnout-sim` with HOSTS simulated hosts that report
# and long-poll every 10 s for DURATION, and prints the simulator's summary:
# coordinator CPU and RSS over the window, report latency p50/p99, errors.
#
#   bash bench/fleet.sh                      # 10,000 hosts for 120 s
#   HOSTS=500 DURATION=20s bash bench/fleet.sh
#   SMOKE=1 bash bench/fleet.sh              # CI: 50 hosts, 12 s (over one report interval), debug build, fails on any error
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=${SMOKE:-}
HOSTS=${HOSTS:-$([ -n "$SMOKE" ] && echo 50 || echo 10000)}
DURATION=${DURATION:-$([ -n "$SMOKE" ] && echo 12s || echo 120s)}
work=$(pwd)/target/bench/fleet
rm -rf "$work" && mkdir -p "$work"
if [ -n "$SMOKE" ]; then
    cargo build --quiet --bin turnout --bin turnout-sim
    bin=$(pwd)/target/debug
else
    cargo build --release --quiet --bin turnout --bin turnout-sim
    bin=$(pwd)/target/release
fi
"$bin/turnout" keygen --out "$work/k" >/dev/null
"$bin/turnout" trust init --key "$work/k.pub.pem" --threshold 1 --out "$work/trust.json" >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
ulimit -n "$(ulimit -Hn)"
"$bin/turnout" serve --listen "127.0.0.1:$port" --state-dir "$work/coordinator" --trust "$work/trust.json" --report-interval 10s --init > "$work/serve.out" 2> "$work/serve.log" &
serve=$!
trap 'kill $serve 2>/dev/null; wait $serve 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q tnt_ "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
token=$(grep -o 'tnt_[A-Za-z0-9_-]*' "$work/serve.out")
"$bin/turnout-sim" --coordinator "http://127.0.0.1:$port" --token "$token" --hosts "$HOSTS" --duration "$DURATION" \
    --coordinator-pid "$serve" --json "$work/summary.json"
if [ -n "$SMOKE" ]; then
    python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); sys.exit(0 if s["errors"] == 0 and s["reports"] > 0 else 1)' "$work/summary.json" \
        || { echo "fleet smoke: errors or no reports" >&2; exit 1; }
    echo "fleet smoke: ok"
fi
