#!/usr/bin/env bash
# The whole test suite: installs what is missing (scripts/setup.sh), then runs every test
# against real servers started by the tests themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source "${VEZA_CI_HOME:-/opt/veza-dr-ci}/env.sh"
# Runbook-step plugins: built from source for wasm32 (plugins/dist/*.wasm), their shared helpers
# tested natively.
bash plugins/build.sh
cargo fmt --all --check
cargo fmt --all --check --manifest-path plugins/Cargo.toml
cargo clippy --release --all-targets --quiet -- -D warnings
cargo clippy --quiet --manifest-path plugins/Cargo.toml -p kit -- -D warnings
cargo test --quiet --manifest-path plugins/Cargo.toml -p kit
cargo test --release --workspace --no-fail-fast "$@"
# The Debian package: built, installed on this machine, and checked.
bash scripts/package-test.sh
