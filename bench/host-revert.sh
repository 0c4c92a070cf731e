#!/usr/bin/env bash
# Benchmark: host revert time (performance issue, scenario 7). A real
# `turnout-agent run` supervises one exec demo service with an http check
# every INTERVAL (3 failures in a row revert). Release 1.0.0 is healthy;
# each run installs a new 2.0.x that turns unhealthy 1 s after it starts.
# The time measured runs from the agent's first failing check (its log line,
# `--log-format json`) to the moment 1.0.0 answers /healthz with 200 again,
# seen by a prober polling every 2 ms. Prints each run and the median.
#
#   bash bench/host-revert.sh            # 5 runs
#   RUNS=3 INTERVAL=500ms bash bench/host-revert.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
INTERVAL=${INTERVAL:-1s}
work=$(pwd)/target/bench/host-revert
rm -rf "$work" && mkdir -p "$work"
. bench/lib.sh
bench_build turnout turnout-agent
agent=$bin/turnout-agent
port=$(free_port)
release_keys "$work"
cat > "$work/agent.toml" <<TOML
state_dir = "$work/state"
trust = "$work/trust.json"
[[service]]
name = "web"
supervisor = "exec"
exec = ["bin/demo", "--port", "$port"]
[service.bake]
min_healthy = "10s"
deadline = "60s"
[[service.check]]
kind = "http"
url = "http://127.0.0.1:$port/healthz"
interval = "$INTERVAL"
timeout = "500ms"
failure = 3
# Measured from the first failing check: none is forgiven.
start_period = "0s"
TOML
release() { # version mode
    demo_release "$work" web "$1" "$2" "$work/web-$1.tnt"
}
export TURNOUT_AGENT_CONFIG="$work/agent.toml"
"$agent" --log-format json run 2> "$work/daemon.log" &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$work/state/agent.sock" ] && break; sleep 0.1; done
release 1.0.0 healthy
"$agent" install "$work/web-1.0.0.tnt" --service web >/dev/null

for i in $(seq "$RUNS"); do
    release "2.0.$i" fail-after
    : > "$work/probe-$i.log"
    # The prober: the first 503 seen, and the first 200 from 1.0.0 after it.
    python3 - "$port" "$work/probe-$i.log" <<'PY' &
import sys, time, urllib.request, urllib.error
port, out = sys.argv[1], sys.argv[2]
seen_bad = None
deadline = time.time() + 120
while time.time() < deadline:
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read().decode()
        if seen_bad and body.startswith("ok 1.0.0"):
            open(out, "w").write(f"{seen_bad} {time.time()}\n")
            break
    except urllib.error.HTTPError:
        seen_bad = seen_bad or time.time()
    except OSError:
        pass
    time.sleep(0.002)
PY
    prober=$!
    code=0
    "$agent" install "$work/web-2.0.$i.tnt" --service web >/dev/null 2>&1 || code=$?
    wait $prober
    [ "$code" = 5 ] || { echo "run $i: install of 2.0.$i exited $code; expected 5 (reverted)" >&2; exit 1; }
    python3 - "$work/daemon.log" "$work/probe-$i.log" "2.0.$i" "$INTERVAL" <<'PY'
import json, sys, datetime
log, probe, version, interval = sys.argv[1:]
first_fail = None
for line in open(log):
    try:
        entry = json.loads(line)
    except ValueError:
        continue
    if "started failing during the bake" in entry["msg"]:
        first_fail = datetime.datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).timestamp()
seen_bad, serving = map(float, open(probe).read().split())
print(f"{version}: first failing check to 1.0.0 serving again {serving - first_fail:.3f} s "
      f"(the service had turned unhealthy {first_fail - seen_bad:.3f} s before the agent's first failing check)")
PY
done | tee "$work/runs.txt"
python3 - "$work/runs.txt" "$INTERVAL" <<'PY'
import re, statistics, sys
times = [float(re.search(r"again ([0-9.]+) s", l).group(1)) for l in open(sys.argv[1])]
print(f"median of {len(times)} runs: {statistics.median(times):.3f} s from the first failing check to the previous release serving (checks every {sys.argv[2]}, 3 failures revert)")
PY
