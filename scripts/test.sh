#!/usr/bin/env bash
# The whole test suite: installs what is missing (scripts/setup.sh), then runs every test
# against real servers started by the tests themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source "${VEZA_CI_HOME:-/opt/veza-dr-ci}/env.sh"
cargo fmt --all --check
cargo clippy --release --all-targets --quiet -- -D warnings
cargo test --release --workspace "$@"
