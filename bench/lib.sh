#!/usr/bin/env bash
# What the benchmark scripts share. Sourced from the repository's root, not run.

# bench_build BIN...: builds these binaries, debug when SMOKE is set and
# release otherwise, and sets $bin to the directory holding them.
bench_build() {
    local target=${CARGO_TARGET_DIR:-$(pwd)/target} args=() name
    for name in "$@"; do args+=(--bin "$name"); done
    if [ -n "${SMOKE:-}" ]; then
        cargo build --quiet "${args[@]}"
        bin=$target/debug
    else
        cargo build --release --quiet "${args[@]}"
        bin=$target/release
    fi
}

# free_port: prints a free TCP port on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# release_keys DIR: a release key, DIR/k.key.pem, and a trust file trusting
# it, DIR/trust.json.
release_keys() {
    "$bin/turnout" keygen --out "$1/k" >/dev/null
    "$bin/turnout" trust init --key "$1/k.pub.pem" --threshold 1 --out "$1/trust.json" >/dev/null
}

# demo_release DIR NAME VERSION MODE OUT: packs into OUT a release NAME
# VERSION of the agent's demo service (entry bin/demo, takes --port) that
# behaves as MODE (healthy, fail-after with after = 1s, ...), signed with
# DIR/k.key.pem.
demo_release() {
    local dir=$1 name=$2 version=$3 mode=$4 out=$5
    local src="$dir/src-$name-$version"
    mkdir -p "$src/bin"
    printf '#!/bin/sh\nexec %s demo-service --behaviour "$(dirname "$0")/../behaviour.toml" "$@"\n' "$bin/turnout" > "$src/bin/demo"
    chmod 755 "$src/bin/demo"
    printf 'version = "%s"\nmode = "%s"\nafter = "1s"\n' "$version" "$mode" > "$src/behaviour.toml"
    "$bin/turnout" pack "$src" --name "$name" --version "$version" --entry bin/demo --key "$dir/k.key.pem" --out "$out" >/dev/null
}
