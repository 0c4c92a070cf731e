#!/usr/bin/env bash
# Builds a recorded Turnout release from git history and prints the
# directory that holds its binaries.
#
#   tests/compat/build.sh 0.1.0        # -> /var/cache/turnout-compat/0.1.0-4501c4e626fa/bin
#
# The release's commit comes from compat/releases.toml. Its source is taken
# with `git archive` (the work tree is never touched) and built with its own
# Cargo.lock (--locked) into a target directory of its own under the cache
# ($TURNOUT_COMPAT_CACHE, default /var/cache/turnout-compat), so a second run
# on the same machine finds the binaries and builds nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."

version=${1:?usage: tests/compat/build.sh VERSION (a version in compat/releases.toml)}
commit=$(awk -v want="$version" '
    /^\[\[release\]\]/ { v = ""; c = "" }
    /^version *=/ { v = $0; sub(/^version *= *"/, "", v); sub(/".*/, "", v) }
    /^commit *=/  { c = $0; sub(/^commit *= *"/, "", c); sub(/".*/, "", c) }
    v == want && c != "" { print c; exit }
' compat/releases.toml)
if [ -z "$commit" ]; then
    echo "release $version is not in compat/releases.toml; recorded: $(grep -o '^version = "[^"]*"' compat/releases.toml | cut -d'"' -f2 | tr '\n' ' ')" >&2
    exit 2
fi
if ! git cat-file -e "$commit^{commit}" 2>/dev/null \
    && [ "$(git rev-parse --is-shallow-repository)" = true ]; then
    echo "this clone is shallow: fetching the history that holds release $version" >&2
    git fetch --quiet --unshallow >&2 || true
fi
if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
    echo "this clone lacks commit $commit of release $version (a shallow clone?): run \`git fetch --unshallow\` and try again" >&2
    exit 3
fi

cache=${TURNOUT_COMPAT_CACHE:-/var/cache/turnout-compat}
home="$cache/$version-${commit:0:12}"
bin="$home/bin"
if [ -x "$bin/turnout" ] && [ "$(cat "$bin/.commit" 2>/dev/null)" = "$commit" ]; then
    echo "$bin"
    exit 0
fi

rm -rf "$bin"
if [ ! -f "$home/src/Cargo.lock" ]; then
    rm -rf "$home/src"
    mkdir -p "$home/src"
    git archive "$commit" | tar -x -C "$home/src"
fi
echo "building turnout $version (commit ${commit:0:12}) into $home/target" >&2
(
    cd "$home/src"
    CARGO_INCREMENTAL=0 CARGO_TARGET_DIR="$home/target" \
        cargo build --locked --quiet --bin turnout -p turnout >&2
)
mkdir -p "$bin"
cp "$home/target/debug/turnout" "$bin/turnout"
echo "$commit" > "$bin/.commit"
echo "$bin"
