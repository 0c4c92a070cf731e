#!/usr/bin/env bash
# Benchmark: verify-and-unpack of a signed bundle vs `sha256sum` over the same
# payload, in the same run, on this machine. Prints medians of RUNS runs.
#
#   bash bench/verify.sh            # 256 MiB payload, 7 runs
#   MIB=64 RUNS=3 bash bench/verify.sh
#
# The payload is 224 MiB in one file plus 32 files of 1 MiB (random data, so
# nothing compresses or dedups). Files are read from the page cache (each run
# is preceded by a warm-up read), and unpacking writes into the page cache of
# a directory under target/, as an agent's staging directory on a host would;
# the fsync before a switch is measured separately (sync column).
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${MIB:-256}
RUNS=${RUNS:-7}
work=target/bench/verify
rm -rf "$work" && mkdir -p "$work/payload/parts"

cargo build --release --quiet --bin turnout --bin turnout-agent
turnout=target/release/turnout
agent=target/release/turnout-agent

big=$((MIB - 32))
head -c "$((big << 20))" /dev/urandom > "$work/payload/big.bin"
for i in $(seq -w 1 32); do head -c $((1 << 20)) /dev/urandom > "$work/payload/parts/$i.bin"; done
printf '#!/bin/sh\n' > "$work/payload/run" && chmod 755 "$work/payload/run"
"$turnout" keygen --out "$work/k" >/dev/null
"$turnout" trust init --key "$work/k.pub.pem" --threshold 1 --out "$work/trust.json" >/dev/null
"$turnout" pack "$work/payload" --name bench --version 1.0.0 --entry run --key "$work/k.key.pem" --out "$work/bench.tnt" >/dev/null

now_ns() { date +%s%N; }
# Runs "$@" once, prints elapsed seconds.
timed() {
    local t0 t1
    t0=$(now_ns)
    "$@" >/dev/null
    t1=$(now_ns)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f\n", (b - a) / 1e9 }'
}
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

unpack_and_sync() {
    rm -rf "$work/dest"
    "$agent" verify "$work/bench.tnt" --trust "$work/trust.json" --unpack-to "$work/dest"
}

: > "$work/sha" ; : > "$work/ossl" ; : > "$work/verify" ; : > "$work/unpack" ; : > "$work/sync"
for run in $(seq 1 "$RUNS"); do
    cat "$work/bench.tnt" "$work/payload/big.bin" "$work/payload/parts/"* > /dev/null
    timed sha256sum "$work/payload/big.bin" "$work/payload/parts/"* >> "$work/sha"
    timed openssl dgst -sha256 "$work/payload/big.bin" "$work/payload/parts/"* >> "$work/ossl"
    timed "$turnout" verify "$work/bench.tnt" --trust "$work/trust.json" >> "$work/verify"
    timed unpack_and_sync >> "$work/unpack"
    timed sync >> "$work/sync"
done

sha=$(median < "$work/sha"); ossl=$(median < "$work/ossl"); verify=$(median < "$work/verify"); unpack=$(median < "$work/unpack"); synced=$(median < "$work/sync")
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
shani=$(grep -qw sha_ni /proc/cpuinfo && echo yes || echo no)
awk -v mib="$MIB" -v runs="$RUNS" -v sha="$sha" -v ossl="$ossl" -v ver="$verify" -v unp="$unpack" -v syn="$synced" \
    -v cpu="$cpu" -v cores="$(nproc)" -v shani="$shani" 'BEGIN {
    printf "machine: %s, %d cores, SHA-NI %s; payload %d MiB; median of %d runs\n", cpu, cores, shani, mib, runs
    printf "%-34s %9s %10s %12s %14s\n", "", "seconds", "MiB/s", "vs sha256sum", "vs openssl dgst"
    printf "%-34s %9.3f %10.0f %12s %14.2fx\n", "sha256sum (coreutils)", sha, mib / sha, "1.00x", ossl / sha
    printf "%-34s %9.3f %10.0f %11.2fx %14s\n", "openssl dgst -sha256", ossl, mib / ossl, sha / ossl, "1.00x"
    printf "%-34s %9.3f %10.0f %11.2fx %14.2fx\n", "turnout verify (no write)", ver, mib / ver, sha / ver, ossl / ver
    printf "%-34s %9.3f %10.0f %11.2fx %14.2fx\n", "turnout-agent verify --unpack-to", unp, mib / unp, sha / unp, ossl / unp
    printf "%-34s %9.3f\n", "sync after unpack (to disk)", syn
}'
