#!/usr/bin/env bash
# Benchmark: the agent's footprint at rest. `turnout-agent run` manages three
# exec-supervised demo services, each with health checks probing every
# INTERVAL (http, tcp, process). After they are installed and healthy, the
# agent's RSS and CPU time are read from /proc at the start and end of an
# idle period (default 5 minutes). Also reports the stripped binary size.
#
#   bash bench/agent-footprint.sh          # 300 s idle
#   IDLE=30 bash bench/agent-footprint.sh  # a quick look
#   INTERVAL=5s bash bench/agent-footprint.sh  # checks every 5 s instead of 1 s
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE=${IDLE:-300}
INTERVAL=${INTERVAL:-1s}
work=$(pwd)/target/bench/footprint
rm -rf "$work" && mkdir -p "$work"
cargo build --release --quiet --bin turnout --bin turnout-agent
turnout=$(pwd)/target/release/turnout
agent=$(pwd)/target/release/turnout-agent

"$turnout" keygen --out "$work/k" >/dev/null
"$turnout" trust init --key "$work/k.pub.pem" --threshold 1 --out "$work/trust.json" >/dev/null
{
    echo "state_dir = \"$work/state\""
    echo "trust = \"$work/trust.json\""
} > "$work/agent.toml"
port=19500
for name in web api worker; do
    port=$((port + 1))
    src="$work/src-$name"
    mkdir -p "$src/bin"
    printf '#!/bin/sh\nexec %s demo-service --behaviour "$(dirname "$0")/../behaviour.toml" "$@"\n' "$agent" > "$src/bin/demo"
    chmod 755 "$src/bin/demo"
    printf 'version = "1.0.0"\nmode = "healthy"\n' > "$src/behaviour.toml"
    "$turnout" pack "$src" --name "$name" --version 1.0.0 --entry bin/demo --key "$work/k.key.pem" --out "$work/$name.tnt" >/dev/null
    cat >> "$work/agent.toml" <<TOML
[[service]]
name = "$name"
supervisor = "exec"
exec = ["bin/demo", "--port", "$port"]
[service.bake]
min_healthy = "1s"
deadline = "20s"
[[service.check]]
kind = "http"
url = "http://127.0.0.1:$port/healthz"
interval = "$INTERVAL"
[[service.check]]
kind = "tcp"
address = "127.0.0.1:$port"
interval = "$INTERVAL"
[[service.check]]
kind = "process"
max_rss = "256MiB"
max_cpu = 90
interval = "$INTERVAL"
TOML
done
export TURNOUT_AGENT_CONFIG="$work/agent.toml"
"$agent" run 2> "$work/daemon.log" &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$work/state/agent.sock" ] && break; sleep 0.1; done
for name in web api worker; do "$agent" install "$work/$name.tnt" --service "$name" >/dev/null; done

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$daemon/status"; }
ticks() { awk '{ sub(/.*\) /, ""); split($0, f, " "); print f[12] + f[13] }' "/proc/$daemon/stat"; }
rss0=$(rss_kib); t0=$(ticks); s0=$(date +%s.%N)
sleep "$IDLE"
rss1=$(rss_kib); t1=$(ticks); s1=$(date +%s.%N)
healthy=$("$agent" status --json | grep -c '"health": "healthy"' || true)
size=$(stat -c %s "$agent")
awk -v r0="$rss0" -v r1="$rss1" -v t0="$t0" -v t1="$t1" -v s0="$s0" -v s1="$s1" -v size="$size" -v idle="$IDLE" -v interval="$INTERVAL" -v ok="$healthy" 'BEGIN {
    hz = 100
    printf "agent at rest for %d s with 3 services, 9 checks every %s (%d of 3 healthy at the end)\n", idle, interval, ok
    printf "RSS at start %.1f MiB, at end %.1f MiB (growth %.0f KiB)\n", r0 / 1024, r1 / 1024, r1 - r0
    printf "CPU %.3f%% of one core (%d ticks in %.0f s)\n", (t1 - t0) / hz / (s1 - s0) * 100, t1 - t0, s1 - s0
    printf "binary %s bytes (%.1f MB), stripped release build\n", size, size / 1e6
}'
