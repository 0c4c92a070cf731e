#!/usr/bin/env bash
# The compatibility suite: builds each recorded earlier release
# (tests/compat/build.sh, cached) and runs tests/tests/compat.rs against it
# with this build. CI runs it; run it before any change to the wire.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(bash tests/compat/build.sh 0.1.0)
export TURNOUT_COMPAT_0_1_0="$bin/turnout"
# This build's binaries as `cargo test --workspace` builds them (with the
# test hooks and the demo service the fleet harness uses): nothing to do
# when that ran just before.
cargo test --workspace --locked --no-run --quiet
cargo test --locked -p turnout-tests --test compat -- --ignored --test-threads 2
