#!/usr/bin/env bash
#! The whole test suite, from a fresh Debian 12 machine: installs what is
#! missing (system packages, the test guest image), starts one PostgreSQL for
#! the run, then checks formatting and lints and runs every test.
#!
#! Usage: scripts/test.sh [extra cargo-nextest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-host.sh
bash scripts/build-guest-image.sh

if ! command -v cargo >/dev/null 2>&1; then
    echo "test: cargo not found; install Rust (https://rustup.rs) first" >&2
    exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install cargo-nextest --locked
fi

pgdir=$(mktemp -d /tmp/stratus-test-pg.XXXXXX)
cleanup() { bash scripts/test-postgres.sh stop "$pgdir"; }
trap cleanup EXIT
eval "$(bash scripts/test-postgres.sh start "$pgdir")"
echo "test: PostgreSQL for this run at $STRATUS_TEST_PG_URL"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
profile=default
if [ "${CI:-}" = "true" ]; then profile=ci; fi
cargo nextest run --workspace --locked --profile "$profile" "$@"
