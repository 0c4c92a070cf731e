#!/usr/bin/env bash
# Benchmarks of the coordinator under a simulated fleet (performance issue,
# scenarios 1 to 5). Each run starts a fresh release `turnout serve` (10 s
# report interval) as its own process, pushes two signed releases of service
# `web`, then runs `turnout-sim` with HOSTS simulated hosts and the chosen
# scenario, and prints its JSON summary. With RUNS > 1 it repeats the run and
# prints the median of every figure (bench/median.py).
#
#   bash bench/fleet.sh                             # steady: 10,000 hosts for 120 s
#   SCENARIO=storm bash bench/fleet.sh              # restart under 10,000 hosts
#   SCENARIO=waves bash bench/fleet.sh              # a 4-wave rollout over 1,000 hosts, zero bake
#   SCENARIO=rollback bash bench/fleet.sh           # rollback --all-at-once of 10,000 hosts
#   SCENARIO=decision bash bench/fleet.sh           # a failing canary: first failing check to decision
#   HOSTS=500 DURATION=20s RUNS=3 bash bench/fleet.sh
#   SMOKE=1 SCENARIO=waves bash bench/fleet.sh      # CI: small N, debug build, checks the result
#   SCRAPE=46 bash bench/fleet.sh                   # with a /metrics scrape 46 times a second
#   PLAINTEXT=1 bash bench/fleet.sh                 # plain HTTP (--plaintext) instead of TLS, to compare
set -euo pipefail
cd "$(dirname "$0")/.."
SCENARIO=${SCENARIO:-steady}
PLAINTEXT=${PLAINTEXT:-}
SCRAPE=${SCRAPE:-0}
SMOKE=${SMOKE:-}
RUNS=${RUNS:-1}
case "$SCENARIO" in
    steady) full=10000 smoke=50 ;;
    storm) full=10000 smoke=50 ;;
    waves) full=1000 smoke=50 ;;
    rollback) full=10000 smoke=100 ;;
    decision) full=100 smoke=20 ;;
    *) echo "SCENARIO must be steady, storm, waves, rollback or decision; found ${SCENARIO@Q}" >&2; exit 2 ;;
esac
HOSTS=${HOSTS:-$([ -n "$SMOKE" ] && echo $smoke || echo $full)}
DURATION=${DURATION:-$([ -n "$SMOKE" ] && echo 12s || echo 120s)}
root=$(pwd)/target/bench/fleet-$SCENARIO
rm -rf "$root" && mkdir -p "$root"
. bench/lib.sh
bench_build turnout turnout-sim
ulimit -n "$(ulimit -Hn)"
serve=
trap '[ -z "$serve" ] || kill $serve 2>/dev/null; wait 2>/dev/null || true' EXIT

run() { # $1: the run's directory
    local work=$1
    mkdir -p "$work/payload"
    release_keys "$work"
    local port
    port=$(free_port)
    # TLS, as agents connect; PLAINTEXT=1 measures plain HTTP for comparison.
    local mode="--san 127.0.0.1"
    [ -z "$PLAINTEXT" ] || mode="--plaintext"
    local cmd="$bin/turnout serve --listen 127.0.0.1:$port --state-dir $work/coordinator --trust $work/trust.json --report-interval 10s --metrics-public $mode"
    $cmd --init --profile "$work/profile.toml" > "$work/serve.out" 2> "$work/serve.log" &
    serve=$!
    for _ in $(seq 100); do grep -q tnt_ "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
    local token
    token=$(grep -o 'tnt_[A-Za-z0-9_-]*' "$work/serve.out")
    local scheme=https
    [ -z "$PLAINTEXT" ] || scheme=http
    export TURNOUT_COORDINATOR="$scheme://127.0.0.1:$port" TURNOUT_TOKEN="$token" TURNOUT_CA="$work/coordinator/tls/ca.pem"
    [ -z "$PLAINTEXT" ] || unset TURNOUT_CA
    printf '#!/bin/sh\nexec sleep infinity\n' > "$work/payload/run" && chmod +x "$work/payload/run"
    for version in 1.0.0 2.0.0; do
        "$bin/turnout" pack "$work/payload" --name web --version $version --entry run --key "$work/k.key.pem" --out "$work/web-$version.tnt" >/dev/null
        "$bin/turnout" bundle push "$work/web-$version.tnt" >/dev/null
    done
    local extra=()
    case "$SCENARIO" in
        steady) extra=(--duration "$DURATION") ;;
        storm) extra=(--restart "$cmd >>$work/serve.out 2>>$work/serve.log") ;;
        waves) extra=(--release web@2.0.0 --install-ms 0) ;;
        rollback) extra=(--release web@1.0.0 --release web@2.0.0) ;;
        decision) extra=(--release web@2.0.0 --fail-percent 100 --check-interval-ms 1000 --failure-threshold 3) ;;
    esac
    local scraper=
    if [ "$SCRAPE" -gt 0 ]; then
        # A bounded scrape loop: SCRAPE requests a second while the coordinator runs.
        python3 - "$TURNOUT_COORDINATOR" "$SCRAPE" "$serve" "$work/coordinator/tls/ca.pem" <<'PY' &
import os, ssl, sys, time, urllib.request
base, rate, pid, ca = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
context = ssl.create_default_context(cafile=ca) if base.startswith("https") else None
deadline = time.time() + 3600
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        break
    started = time.time()
    try:
        urllib.request.urlopen(f"{base}/metrics", timeout=5, context=context).read()
    except Exception:
        pass
    time.sleep(max(0.0, 1 / rate - (time.time() - started)))
PY
        scraper=$!
    fi
    "$bin/turnout-sim" --coordinator "$TURNOUT_COORDINATOR" ${TURNOUT_CA:+--ca "$TURNOUT_CA"} --token "$token" --scenario "$SCENARIO" --hosts "$HOSTS" \
        --coordinator-pid "$serve" --json "$work/summary.json" "${extra[@]}" > "$work/summary.out"
    [ -z "$scraper" ] || kill "$scraper" 2>/dev/null || true
    kill $serve 2>/dev/null || true
    wait $serve 2>/dev/null || true
    serve=
}

for i in $(seq "$RUNS"); do
    run "$root/run-$i"
    cat "$root/run-$i/summary.json"; echo
done
python3 bench/median.py "$SCENARIO" ${SMOKE:+--smoke} "$root"/run-*/summary.json
