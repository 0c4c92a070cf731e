#!/usr/bin/env bash
# End to end with real systemd: N Debian hosts booted with systemd-nspawn,
# each running turnout-agent from its hardened unit and the demo service as
# a real systemd unit, following a coordinator that runs outside them.
#
#   sudo bash tests/systemd/run.sh          # HOSTS=3 by default
#
# Prints one line per check, exits non-zero on the first failure, and always
# removes every host, proxy and file it made (also on Ctrl-C). The hosts
# share the machine's loopback network; each reaches the coordinator through
# its own TCP proxy on 127.0.0.1, which the partition check stops and starts.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "tests/systemd/run.sh needs root (systemd-nspawn)" >&2; exit 1; }
for tool in systemd-nspawn debootstrap nsenter socat curl; do
    command -v "$tool" >/dev/null || { echo "missing $tool: install systemd-container debootstrap util-linux socat curl" >&2; exit 1; }
done
N=${HOSTS:-3}
started=$SECONDS
TARGET=${CARGO_TARGET_DIR:-$(pwd)/target}/debug
BIN=$TARGET/turnout
W=$(mktemp -d /tmp/turnout-systemd.XXXXXX)
# The agent upgrade checks need a newer agent: the same code built with a
# newer version (TURNOUT_BUILD_VERSION), first, then this build. The freeze
# switch below is a test hook: only a fault-injection build has it.
AGENT_NEW=0.2.1-e2e
mkdir -p "$W/agent-new/bin"
TURNOUT_BUILD_VERSION=$AGENT_NEW cargo build --quiet -p turnout-agent --bin turnout-agent --features fault-injection
cp "$TARGET/turnout-agent" "$W/agent-new/bin/turnout-agent"
cargo build --quiet -p turnout-agent --bin turnout-agent --features fault-injection
cargo build --quiet -p turnout --bin turnout --features fault-injection
cp "$TARGET/turnout-agent" "$W/turnout-agent"
declare -a NSPAWN LEADER PROXY PORT PPORT

cleanup() {
    set +e
    for i in $(seq 1 "$N"); do
        [ -n "${NSPAWN[$i]:-}" ] && kill "${NSPAWN[$i]}" 2>/dev/null
        [ -n "${PROXY[$i]:-}" ] && kill "${PROXY[$i]}" 2>/dev/null
    done
    [ -n "${COORD:-}" ] && kill "$COORD" 2>/dev/null
    sleep 1
    for i in $(seq 1 "$N"); do [ -n "${NSPAWN[$i]:-}" ] && kill -9 "${NSPAWN[$i]}" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT
trap 'echo "interrupted"; exit 130' INT TERM

ok() { printf 'ok   %-62s (t+%ss)\n' "$*" "$((SECONDS - started))"; }
fail() { printf 'FAIL %s\n' "$*"; for i in $(seq 1 "$N"); do echo "--- host $i agent journal"; inside "$i" journalctl -u turnout-agent -n 15 --no-pager 2>/dev/null; done; exit 1; }
# wait_until SECONDS DESCRIPTION 'CONDITION': evaluates CONDITION every 0.3 s.
wait_until() {
    local limit=$1 what=$2 condition=$3
    local deadline=$((SECONDS + limit))
    until eval "$condition" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${limit}s waiting for $what: $(eval "$condition" 2>&1 | tail -n 3)"
        sleep 0.3
    done
}
inside() { local i=$1; shift; nsenter -t "${LEADER[$i]}" -a "$@"; }
api() { curl -sf --cacert "$W/coordinator/tls/ca.pem" -H "Authorization: Bearer $TOKEN" "https://127.0.0.1:$CPORT$1"; }
rollout_state() { api "/v1/rollouts/$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"]["state"])'; }
served() { curl -sf "http://127.0.0.1:${PORT[$1]}/version"; }
agent_field() { inside "$1" /usr/local/bin/turnout agent status --json | python3 -c "import json,sys; s=json.load(sys.stdin)[0]; print($2)"; }
host_state() { api /v1/hosts | python3 -c "import json,sys; print(next(h['state'] for h in json.load(sys.stdin) if h['id'] == '$1'))"; }
hosts_reporting() { api /v1/hosts | python3 -c "import json,sys; print(sum(1 for h in json.load(sys.stdin) if h['state'] == 'online' and h['report']))"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

bash tests/systemd/rootfs.sh
ROOTFS=${CACHE:-/var/cache/turnout-e2e}/rootfs

# Keys, trust, and demo releases whose entry runs the demo service from the host's /usr/local/bin/turnout.
"$BIN" keygen --out "$W/release" >/dev/null
"$BIN" trust init --key "$W/release.pub.pem" --threshold 1 --out "$W/trust.json" >/dev/null
for spec in 1.0.0:healthy 2.0.0:healthy 3.0.0:unhealthy 4.0.0:healthy 5.0.0:healthy 6.0.0:healthy; do
    v=${spec%%:*} mode=${spec##*:}
    mkdir -p "$W/src-$v/bin"
    printf '#!/bin/sh\nexec /usr/local/bin/turnout demo-service --behaviour "$(dirname "$0")/../behaviour.toml" "$@"\n' > "$W/src-$v/bin/web"
    chmod 755 "$W/src-$v/bin/web"
    printf 'version = "%s"\nmode = "%s"\n' "$v" "$mode" > "$W/src-$v/behaviour.toml"
    "$BIN" pack "$W/src-$v" --name web --version "$v" --entry bin/web --key "$W/release.key.pem" --out "$W/web-$v.tnt" >/dev/null
done
# Agent releases: the newer build, and three broken ones (fault-injection
# wrappers around the installed binary): one exits when run (its `version`
# still answers, so the pre-flight check passes), one wedges its main loop,
# one offers a protocol no coordinator speaks, so it can never hello.
"$BIN" pack "$W/agent-new" --name turnout-agent --version "$AGENT_NEW" --entry bin/turnout-agent --key "$W/release.key.pem" --out "$W/agent-new.tnt" >/dev/null
broken() { # NAME VERSION SCRIPT
    mkdir -p "$W/agent-$1/bin"
    printf '#!/bin/sh\n%s\n' "$3" > "$W/agent-$1/bin/turnout-agent"
    chmod 755 "$W/agent-$1/bin/turnout-agent"
    "$BIN" pack "$W/agent-$1" --name turnout-agent --version "$2" --entry bin/turnout-agent --provides turnout-proto/1-2 --key "$W/release.key.pem" --out "$W/agent-$1.tnt" >/dev/null 2>&1
}
broken exits 0.9.1-exits 'case "$1" in version) exec /usr/local/bin/turnout-agent "$@";; esac; echo "broken build: exits at start" >&2; exit 1'
broken wedges 0.9.2-wedges 'TURNOUT_TEST_FREEZE=/ exec /usr/local/bin/turnout-agent "$@"'
broken nohello 0.9.3-nohello 'TURNOUT_AGENT_TEST_PROTO=9-9 exec /usr/local/bin/turnout-agent "$@"'
# Says hello and reports, then dies 3 s after each start: before its hold.
broken dies 0.9.4-dies 'case "$1" in version) exec /usr/local/bin/turnout-agent "$@";; esac; (sleep 3; kill -9 $$) & exec /usr/local/bin/turnout-agent "$@"'

CPORT=$(free_port)
"$BIN" serve --listen "127.0.0.1:$CPORT" --state-dir "$W/coordinator" --trust "$W/trust.json" --report-interval 1s --init --profile "$W/profile.toml" > "$W/serve.out" 2> "$W/serve.log" &
COORD=$!
wait_until 20 "the coordinator" 'curl -s --cacert "$W/coordinator/tls/ca.pem" -o /dev/null "https://127.0.0.1:$CPORT/v1/hosts"'
TOKEN=$(grep -o 'tnt_[A-Za-z0-9_-]*' "$W/serve.out")
export TURNOUT_COORDINATOR="https://127.0.0.1:$CPORT" TURNOUT_TOKEN=$TOKEN TURNOUT_CA="$W/coordinator/tls/ca.pem"
for v in 1.0.0 2.0.0 3.0.0 4.0.0 5.0.0 6.0.0; do "$BIN" bundle push "$W/web-$v.tnt" >/dev/null; done
for b in new exits wedges nohello dies; do "$BIN" bundle push "$W/agent-$b.tnt" >/dev/null; done
ENROLL_JSON=$("$BIN" token create --enroll --uses "$N" --json)
ENROLL=$(printf '%s' "$ENROLL_JSON" | grep -o 'tne_[A-Za-z0-9_-]*' | head -n 1)
PIN=$(printf '%s' "$ENROLL_JSON" | grep -o 'sha256:[0-9a-f]\{64\}' | head -n 1)

# The agent's unit as shipped (ExecStart=/usr/local/bin/turnout-agent, this
# build), with a short watchdog and the test-only freeze switch for these checks.
mkdir -p "$W/units"
cp systemd/turnout-agent.service "$W/units/turnout-agent.service"
printf '[Service]\nWatchdogSec=3s\nRestartSec=1s\nEnvironment=TURNOUT_TEST_FREEZE=/run/turnout-freeze\n' > "$W/units/override.conf"

start_proxy() { socat "TCP-LISTEN:${PPORT[$1]},bind=127.0.0.1,fork,reuseaddr" "TCP:127.0.0.1:$CPORT" 2>/dev/null & PROXY[$1]=$!; }
stop_proxy() { kill "${PROXY[$1]}" 2>/dev/null; pkill -f "TCP-LISTEN:${PPORT[$1]}," 2>/dev/null || true; }

boot() {
    local i=$1
    systemd-nspawn --quiet --boot --register=no --keep-unit -D "$ROOTFS" --volatile=overlay --machine="tnt-h$i" \
        --bind-ro="$BIN:/usr/local/bin/turnout" \
        --bind-ro="$W/turnout-agent:/usr/local/bin/turnout-agent" \
        --bind="$W/h$i/lib:/var/lib/turnout" --bind="$W/h$i/etc:/etc/turnout" \
        --bind-ro="$W/units/turnout-agent.service:/etc/systemd/system/turnout-agent.service" \
        --bind-ro="$W/units/override.conf:/etc/systemd/system/turnout-agent.service.d/override.conf" \
        --bind-ro="$W/h$i/web.service:/etc/systemd/system/web.service" \
        > "$W/h$i/console.log" 2>&1 &
    NSPAWN[$i]=$!
    wait_until 30 "host $i to start" 'pgrep -P "${NSPAWN[$i]}"'
    LEADER[$i]=$(pgrep -P "${NSPAWN[$i]}" | head -n 1)
    wait_until 120 "host $i to boot" 'inside "$i" systemctl is-system-running | grep -E "running|degraded" >/dev/null'
    inside "$i" systemctl daemon-reload
    inside "$i" systemctl start turnout-agent
}

for i in $(seq 1 "$N"); do
    PORT[$i]=$(free_port); PPORT[$i]=$(free_port)
    mkdir -p "$W/h$i/lib" "$W/h$i/etc"
    cp "$W/trust.json" "$W/h$i/etc/trust.json"
    cat > "$W/h$i/etc/agent.toml" <<TOML
state_dir = "/var/lib/turnout"
trust = "/etc/turnout/trust.json"
labels = { role = "web" }
upgrade_deadline = "20s"
[[service]]
name = "web"
supervisor = "systemd"
unit = "web.service"
[service.bake]
min_healthy = "2s"
deadline = "20s"
[[service.check]]
kind = "http"
url = "http://127.0.0.1:${PORT[$i]}/healthz"
interval = "200ms"
start_period = "3s"
[[service.check]]
kind = "systemd"
interval = "200ms"
TOML
    sed "s#--port 8080#--port ${PORT[$i]}#; s#DynamicUser=yes#DynamicUser=no#" systemd/web.service.example > "$W/h$i/web.service"
    start_proxy "$i"
    boot "$i"
    inside "$i" /usr/local/bin/turnout agent enroll --coordinator "https://127.0.0.1:${PPORT[$i]}" --token "$ENROLL" --ca-pin "$PIN" --host "h$i" >/dev/null
    inside "$i" systemctl restart turnout-agent
done
wait_until 30 "every host to report" 'test "$(hosts_reporting)" = "$N"'
ok "$N hosts booted; agents run from their hardened units and report"
[ "$(inside 1 systemctl show -p Type --value turnout-agent)" = notify ] || fail "the agent's unit is not Type=notify"
inside 1 systemctl status turnout-agent --no-pager | grep 'Status: "web' >/dev/null || fail "systemctl status shows no STATUS= line from the agent"
ok "Type=notify: READY sent, STATUS= shown by systemctl status"

run_rollout() { # VERSION WAVES... ; prints the rollout id
    local v=$1; shift
    "$BIN" rollout start --service web --release "web@$v" --waves "$(IFS=,; echo "$*")" --max-parallel 2 --json \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'
}

# 1. v1 everywhere, then v2 through canary and waves.
id=$(run_rollout 1.0.0 100%)
wait_until 90 "web 1.0.0 everywhere" 'test "$(rollout_state "$id")" = succeeded'
id=$(run_rollout 2.0.0 1 50% 100%)
wait_until 120 "the v2 rollout to succeed" 'test "$(rollout_state "$id")" = succeeded'
for i in $(seq 1 "$N"); do
    [ "$(served "$i")" = 2.0.0 ] || fail "host $i serves $(served "$i"), not 2.0.0"
    pid=$(inside "$i" systemctl show -p MainPID --value web.service)
    cwd=$(inside "$i" readlink "/proc/$pid/cwd")
    slot=$(agent_field "$i" 's["active_slot"]')
    [ "$cwd" = "/var/lib/turnout/services/web/$slot" ] || fail "host $i: web.service runs in $cwd, but the active slot is $slot"
done
ok "v2 rolled out in waves; every web.service runs v2 from the active slot"

# 2. A bad v3: the canary fails, the fleet rolls back.
id=$(run_rollout 3.0.0 1 100%)
wait_until 120 "the v3 rollout to roll back" 'test "$(rollout_state "$id")" = rolled_back'
for i in $(seq 1 "$N"); do [ "$(served "$i")" = 2.0.0 ] || fail "host $i serves $(served "$i") after the rollback"; done
ok "v3's canary failed health; rolled back; every host serves 2.0.0"

# 3. The agent killed with SIGKILL mid-bake: systemd restarts it, it recovers.
id=$(run_rollout 4.0.0 1 100%)
canary=$(api "/v1/rollouts/$id" | python3 -c 'import json,sys; print(json.load(sys.stdin)["waves"][0][0][1:])')
wait_until 60 "the canary to bake" 'test "$(agent_field "$canary" '\''s["state"]'\'')" = baking'
# SIGKILL the main process itself (systemd in this container cannot signal whole cgroups).
inside "$canary" kill -9 "$(inside "$canary" systemctl show -p MainPID --value turnout-agent)"
wait_until 30 "systemd to restart the agent" 'test "$(inside "$canary" systemctl show -p NRestarts --value turnout-agent)" -ge 1'
wait_until 60 "the agent to recover" 'test "$(agent_field "$canary" '\''s["state"]'\'')" = idle'
[ "$(agent_field "$canary" 's["last_outcome"]["kind"]')" = interrupted ] || fail "the canary's last outcome is not interrupted"
wait_until 60 "the v4 rollout to roll back" 'test "$(rollout_state "$id")" = rolled_back'
[ "$(served "$canary")" = 2.0.0 ] || fail "the canary serves $(served "$canary") after recovering"
ok "agent SIGKILLed mid-bake: restarted by systemd, reverted, reported interrupted"

# 4. A wedged main loop: the watchdog fires and systemd restarts the agent.
before=$(inside 1 systemctl show -p NRestarts --value turnout-agent)
pid=$(inside 1 systemctl show -p MainPID --value turnout-agent)
inside 1 touch /run/turnout-freeze
wait_until 30 "the watchdog to restart the agent" 'test "$(inside 1 systemctl show -p MainPID --value turnout-agent)" != "$pid" && test "$(inside 1 systemctl show -p NRestarts --value turnout-agent)" -gt "$before"'
inside 1 rm -f /run/turnout-freeze
inside 1 journalctl -u turnout-agent --no-pager | grep 'Watchdog timeout' >/dev/null || fail "no watchdog timeout in host 1's journal"
ok "frozen main loop: watchdog timeout, systemd restarted the agent"
wait_until 30 "host 1's agent to settle after the watchdog" 'test "$(agent_field 1 '\''s["state"]'\'')" = idle'

# 5. One host cut off during its wave: skipped, then it converges.
plan_last=$("$BIN" rollout plan --service web --release web@5.0.0 --waves 1,100% --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["waves"][-1][-1][1:])')
stop_proxy "$plan_last"
wait_until 30 "host $plan_last to count as offline" 'test "$(host_state "h$plan_last")" = offline'
id=$(run_rollout 5.0.0 1 100%)
wait_until 120 "the v5 rollout to finish" 'test "$(rollout_state "$id")" = succeeded'
[ "$(served "$plan_last")" = 2.0.0 ] || fail "the cut-off host moved while cut off"
start_proxy "$plan_last"
wait_until 60 "host $plan_last to come back" 'test "$(host_state "h$plan_last")" = online'
ok "host $plan_last cut off: skipped in its wave, back online when the link returned"

# 6. A host rebooted mid-bake comes back on a committed release.
id=$(run_rollout 6.0.0 1 100%)
canary=$(api "/v1/rollouts/$id" | python3 -c 'import json,sys; print(json.load(sys.stdin)["waves"][0][0][1:])')
wait_until 60 "the canary to bake" 'test "$(agent_field "$canary" '\''s["state"]'\'')" = baking'
inside "$canary" systemctl reboot || true
wait "${NSPAWN[$canary]}" 2>/dev/null || true
boot "$canary"
wait_until 60 "the rebooted host to settle" 'test "$(agent_field "$canary" '\''s["state"]'\'')" = idle'
committed=$(agent_field "$canary" 's["committed"]["version"]')
wait_until 30 "the rebooted host to serve its committed release" 'test "$(served "$canary")" = "$committed"'
ok "host $canary rebooted mid-bake: back on committed $committed ($(agent_field "$canary" 's["last_outcome"]["kind"]'))"

# 7. The agents upgrade themselves, in waves; the coordinator is stopped
#    while the last wave switches: nobody reverts, all finish once it is back.
agent_version() { api /v1/hosts | python3 -c "import json,sys; print(next(h['agent_version'] for h in json.load(sys.stdin) if h['id'] == 'h$1'))"; }
web_pid() { inside "$1" systemctl show -p MainPID --value web.service; }
agent_pid() { inside "$1" systemctl show -p MainPID --value turnout-agent; }
handoff() { inside "$1" cat /var/lib/turnout/agent/handoff.json 2>/dev/null; }
# Past the switch's first deadline, still armed on the new agent (no revert).
outlived_deadline() { handoff "$1" | python3 -c 'import json,sys,time; h=json.load(sys.stdin); sys.exit(0 if h["phase"] == "armed" and time.time()*1000 > h["armed_ms"] + h["window_ms"] + 2000 else 1)'; }
serve_again() {
    "$BIN" serve --listen "127.0.0.1:$CPORT" --state-dir "$W/coordinator" --trust "$W/trust.json" --report-interval 1s >> "$W/serve.out" 2>> "$W/serve.log" &
    COORD=$!
    wait_until 20 "the coordinator to start again" 'curl -s --cacert "$W/coordinator/tls/ca.pem" -o /dev/null "https://127.0.0.1:$CPORT/v1/hosts"'
}
declare -a WEBPID
for i in $(seq 1 "$N"); do WEBPID[$i]=$(web_pid "$i"); done
old_agent=$(agent_version 1)
"$BIN" rollout plan --service turnout-agent --release "turnout-agent@$AGENT_NEW" --waves 1,100% > "$W/plan.txt"
grep -q warning "$W/plan.txt" && fail "the agent plan warns: $(cat "$W/plan.txt")"
id=$("$BIN" rollout start --service turnout-agent --release "turnout-agent@$AGENT_NEW" --waves 1,100% --max-parallel 2 --healthy-deadline 3m --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
first=$(api "/v1/rollouts/$id" | python3 -c 'import json,sys; print(json.load(sys.stdin)["waves"][0][0][1:])')
last=$(api "/v1/rollouts/$id" | python3 -c 'import json,sys; print(json.load(sys.stdin)["waves"][1][0][1:])')
# A new agent on probation is judged only once it confirmed: meanwhile the
# canary wave holds (the hold alone is 6 s).
wait_until 120 "canary $first to start its probation" 'handoff "$first" | grep -q armed'
phase=$(api "/v1/rollouts/$id" | python3 -c "import json,sys; print(json.load(sys.stdin)['hosts']['h$last']['phase'])")
[ "$phase" = waiting ] || fail "host $last is $phase while canary $first is still on probation"
wait_until 120 "host $last to start switching its agent" 'handoff "$last" >/dev/null'
kill "$COORD"; wait "$COORD" 2>/dev/null || true
wait_until 60 "host $last to outlive its first deadline with the coordinator down" 'outlived_deadline "$last"'
inside "$last" cat /var/lib/turnout/agent/progress | grep -q unreachable || fail "host $last's new agent does not say it waits for the coordinator"
ok "coordinator down mid-upgrade: host $last's new agent outlived its deadline, not reverted"
serve_again
wait_until 120 "the agent rollout to succeed" 'test "$(rollout_state "$id")" = succeeded'
for i in $(seq 1 "$N"); do
    [ "$(agent_version "$i")" = "$AGENT_NEW" ] || fail "host $i's agent is $(agent_version "$i"), not $AGENT_NEW"
    [ "$(web_pid "$i")" = "${WEBPID[$i]}" ] || fail "host $i's web.service restarted during the agent upgrade"
    handoff "$i" >/dev/null && fail "host $i still has a switch in flight"
done
ok "agents $old_agent -> $AGENT_NEW in waves; every web.service MainPID unchanged"

# 8. The agent rollout rolled back (to the installed agent), with the
#     canary rebooted during its probation: the new boot gives it a whole
#     window, and it confirms.
ok_id=$id
"$BIN" rollout rollback "$ok_id" >/dev/null
back=$(api "/v1/rollouts/$ok_id" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["switch_order"][-1][1:])')
wait_until 120 "host $back to start its probation on the way back" 'handoff "$back" | grep -q armed'
inside "$back" systemctl reboot || true
wait "${NSPAWN[$back]}" 2>/dev/null || true
boot "$back"
wait_until 180 "the agent rollout to roll back" 'test "$(rollout_state "$ok_id")" = rolled_back'
for i in $(seq 1 "$N"); do
    [ "$(agent_version "$i")" = "$old_agent" ] || fail "host $i runs agent $(agent_version "$i") after the rollback, not $old_agent"
done
inside "$back" /usr/local/bin/turnout-agent upgrade status | grep -q 'current:  .*the installed binary' || fail "host $back does not run the installed agent"
for i in $(seq 1 "$N"); do
    [ "$i" = "$back" ] && continue
    [ "$(web_pid "$i")" = "${WEBPID[$i]}" ] || fail "host $i's web.service restarted during the agent rollback"
done
ok "agent rollout rolled back to $old_agent; host $back rebooted on probation and confirmed in its new boot"
# The rebooted host's web.service is a new process since its boot.
WEBPID[$back]=$(web_pid "$back")

# 9. Broken agents, each to the canary: back on the previous agent by
#    itself, the gate trips, nothing else moves, and it is never retried.
for b in "exits:0.9.1-exits:it exited with status 1" "wedges:0.9.2-wedges:watchdog killed it" "nohello:0.9.3-nohello:no successful hello and report (refused" "dies:0.9.4-dies:last ended with code=killed, status=9/KILL"; do
    IFS=: read -r kind v why <<< "$b"
    t0=$SECONDS
    id=$("$BIN" rollout start --service turnout-agent --release "turnout-agent@$v" --waves 1,100% --healthy-deadline 3m --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    canary=$(api "/v1/rollouts/$id" | python3 -c 'import json,sys; print(json.load(sys.stdin)["waves"][0][0][1:])')
    wait_until 120 "the $kind agent's rollout to roll back" 'test "$(rollout_state "$id")" = rolled_back'
    took=$((SECONDS - t0))
    # The deadline is 20 s: dispatch, download and switch, plus restarts and a report, within a minute.
    [ "$took" -le 60 ] || fail "the $kind agent took ${took}s to be reverted and reported"
    [ "$(agent_version "$canary")" = "$old_agent" ] || fail "canary $canary runs agent $(agent_version "$canary") after the $kind revert"
    "$BIN" rollout status "$id" > "$W/status.txt"
    grep -q "agent upgrade to $v failed" "$W/status.txt" || fail "rollout status does not say why: $(cat "$W/status.txt")"
    grep -qF "$why" "$W/status.txt" || fail "the $kind agent's reason does not say \"$why\": $(cat "$W/status.txt")"
    for i in $(seq 1 "$N"); do
        [ "$(web_pid "$i")" = "${WEBPID[$i]}" ] || fail "host $i's web.service restarted during the $kind agent"
        [ "$i" = "$canary" ] && continue
        [ "$(agent_version "$i")" = "$old_agent" ] || fail "host $i moved during the $kind canary"
    done
    # Not retried: the same rollout again trips at once, and the canary's agent does not restart.
    pid=$(agent_pid "$canary")
    id=$("$BIN" rollout start --service turnout-agent --release "turnout-agent@$v" --waves 1,100% --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    wait_until 60 "the retried $kind rollout to roll back" 'test "$(rollout_state "$id")" = rolled_back'
    [ "$(agent_pid "$canary")" = "$pid" ] || fail "canary $canary tried the failed $kind agent again"
    ok "$kind agent: canary $canary back on $old_agent in ${took}s, gate tripped, not retried"
    grep "agent upgrade to $v failed" "$W/status.txt" | head -n 1 | cut -c1-240
done
reason=$(inside "$canary" /usr/local/bin/turnout-agent upgrade status | grep -c 'reverted')
[ "$reason" -ge 1 ] || fail "turnout-agent upgrade status shows no reverted agent"

# 10. An operator allows a failed version again: it is tried (and fails) again.
inside "$canary" /usr/local/bin/turnout-agent upgrade retry 0.9.4-dies >/dev/null
"$BIN" host label "h$canary" "n=h$canary" >/dev/null
pid=$(agent_pid "$canary")
id=$("$BIN" rollout start --service turnout-agent --release turnout-agent@0.9.4-dies --waves 1,100% --selector "n=h$canary" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
wait_until 120 "the retried version to be tried and rolled back" 'test "$(rollout_state "$id")" = rolled_back'
[ "$(agent_pid "$canary")" != "$pid" ] || fail "canary $canary did not try 0.9.4-dies again after upgrade retry"
[ "$(agent_version "$canary")" = "$old_agent" ] || fail "canary $canary runs $(agent_version "$canary") after the retry"
ok "upgrade retry: host $canary tried 0.9.4-dies again, and was put back again"

echo "all systemd checks passed in $((SECONDS - started))s"
