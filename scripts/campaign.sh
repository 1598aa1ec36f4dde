#!/usr/bin/env bash
# The crash and S3 fault campaigns at full size (CI runs a few rounds of each as tests):
# kill -9 of backup, prune, wal-push and restore at random moments on file://, Moto and Garage,
# of physical PostgreSQL backups, and every command through a fault-injecting proxy in front of
# Moto. Prints one line per campaign: rounds, kills or faults, losses, blocked runs.
#
#   scripts/campaign.sh [ROUNDS]      # default 100 rounds (each round kills each command once)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-100}
bash scripts/setup.sh
# shellcheck disable=SC1091
source "${VEZA_CI_HOME:-/opt/veza-dr-ci}/env.sh"
VEZA_CRASH_ROUNDS=$ROUNDS VEZA_FAULT_ROUNDS=$((ROUNDS / 2)) \
  cargo test --release --test it -- campaign --nocapture --test-threads 1 2>&1 |
  grep -E '^(crash campaign|S3 fault campaign|test |test result)'
