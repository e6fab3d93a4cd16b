#!/usr/bin/env bash
#! Stratus from a fresh Debian 12 machine: installs what is missing, builds,
#! and runs the all-in-one cloud (`stratus up`) in the foreground.
#!
#! Usage: scripts/up.sh [stratus up arguments, e.g. --listen 0.0.0.0:8480]
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-host.sh
bash scripts/build-guest-image.sh
cargo build --release --locked -p stratus
echo "up: the CLI is target/release/stratus (copy it onto your PATH)"
exec target/release/stratus up "$@"
