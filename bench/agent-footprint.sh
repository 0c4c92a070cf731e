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
#   CYCLES=20 bash bench/agent-footprint.sh     # fewer install/rollback cycles
#   SMOKE=1 bash bench/agent-footprint.sh      # CI: debug build, 5 s idle, 3 cycles, checks they work
#   AGENT=/path/to/turnout-agent bash bench/agent-footprint.sh  # another build (an older one, say)
#   RUNS=3 CYCLES=0 bash bench/agent-footprint.sh               # the idle figures 3 times, and their medians
#
# After the idle period, CYCLES (default 100) times: install web 2.0.0, then
# roll back to 1.0.0. The agent's RSS after the cycles, against its RSS at
# rest before them, is the growth (a leak would show here).
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=${SMOKE:-}
IDLE=${IDLE:-$([ -n "$SMOKE" ] && echo 5 || echo 300)}
CYCLES=${CYCLES:-$([ -n "$SMOKE" ] && echo 3 || echo 100)}
INTERVAL=${INTERVAL:-1s}
work=$(pwd)/target/bench/footprint
rm -rf "$work" && mkdir -p "$work"
. bench/lib.sh
bench_build turnout turnout-agent
agent=${AGENT:-$bin/turnout-agent}
RUNS=${RUNS:-1}
release_keys "$work"
{
    echo "state_dir = \"$work/state\""
    echo "trust = \"$work/trust.json\""
} > "$work/agent.toml"
port=19500
for name in web api worker; do
    port=$((port + 1))
    demo_release "$work" "$name" 1.0.0 healthy "$work/$name.tnt"
    [ "$name" != web ] || demo_release "$work" web 2.0.0 healthy "$work/web-2.tnt"
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
# CPU time in nanoseconds, from the scheduler (exact, where /proc/PID/stat
# counts 10 ms ticks), summed over the agent's threads: the runtime thread and
# any blocking-pool thread alive at that moment. A blocking thread that starts
# and exits inside an idle run would be missed; the thread count at the start
# and end of each run is printed so that would show.
cpu_ns() { cat /proc/"$daemon"/task/*/schedstat | awk '{ s += $1 } END { print s }'; }
threads() { ls /proc/"$daemon"/task | wc -l; }
rss0=$(rss_kib)
cpus=()
for run in $(seq "$RUNS"); do
    t0=$(threads); c0=$(cpu_ns); s0=$(date +%s.%N)
    sleep "$IDLE"
    c1=$(cpu_ns); s1=$(date +%s.%N); t1=$(threads)
    cpu=$(awk -v c0="$c0" -v c1="$c1" -v s0="$s0" -v s1="$s1" 'BEGIN { printf "%.4f", (c1 - c0) / 1e9 / (s1 - s0) * 100 }')
    cpus+=("$cpu")
    echo "idle run $run: CPU $cpu% of one core over $IDLE s, RSS $(rss_kib) KiB, threads $t0 -> $t1"
done
rss1=$(rss_kib)
for i in $(seq "$CYCLES"); do
    "$agent" install "$work/web-2.tnt" --service web >/dev/null \
        || { echo "cycle $i: installing web 2.0.0 failed" >&2; exit 1; }
    "$agent" rollback --service web >/dev/null \
        || { echo "cycle $i: rolling web back to 1.0.0 failed" >&2; exit 1; }
    [ $((i % 50)) != 0 ] || echo "after $i cycles: RSS $(rss_kib) KiB"
done
# Let the last cycle's buffers go before reading RSS.
sleep 2
rss2=$(rss_kib)
healthy=$("$agent" status --json | grep -c '"health": "healthy"' || true)
web=$("$agent" status --json | python3 -c 'import json,sys; print(next(s["committed"]["version"] for s in json.load(sys.stdin) if s["service"] == "web"))')
size=$(stat -c %s "$agent")
median=$(printf '%s\n' "${cpus[@]}" | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
awk -v r0="$rss0" -v r1="$rss1" -v r2="$rss2" -v cycles="$CYCLES" -v median="$median" -v runs="$RUNS" -v size="$size" -v idle="$IDLE" -v interval="$INTERVAL" -v ok="$healthy" 'BEGIN {
    printf "agent at rest for %d x %d s with 3 services, 9 checks every %s (%d of 3 healthy at the end)\n", runs, idle, interval, ok
    printf "RSS at start %.1f MiB, at end %.1f MiB (growth %.0f KiB)\n", r0 / 1024, r1 / 1024, r1 - r0
    printf "CPU %.3f%% of one core (median of %d idle runs)\n", median, runs
    printf "RSS after %d install/rollback cycles %.1f MiB (growth %.0f KiB since the idle period ended)\n", cycles, r2 / 1024, r2 - r1
    printf "binary %s bytes (%.1f MB)\n", size, size / 1e6
}'
if [ -n "$SMOKE" ]; then
    [ "$healthy" = 3 ] && [ "$web" = 1.0.0 ] \
        || { echo "footprint smoke: $healthy of 3 services healthy, web on $web (expected 1.0.0)" >&2; exit 1; }
    echo "footprint smoke: ok"
fi
