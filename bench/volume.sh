#!/usr/bin/env bash
# veza-dr vs restic on the same generated tree, same machine, same run.
#   bench/volume.sh [MIB]        (default 2048; BENCH_DIR to choose the scratch directory)
# Prints wall time, bytes stored and peak RSS for: first backup, unchanged re-run, restore.
# Both tools write to a local repository on the same disk; page cache is warm for both.
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-2048}
D=${BENCH_DIR:-/tmp/veza-bench}
command -v restic >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -q restic >/dev/null; }
cargo build --release --quiet --bin veza-dr --example gentree
V=$PWD/target/release/veza-dr
rm -rf "$D"; mkdir -p "$D/policies"
echo "generating a ${MIB} MiB tree in $D/src ..." >&2
target/release/examples/gentree "$D/src" "$MIB" 42
FILES=$(find "$D/src" -type f | wc -l)
$V keygen -o "$D/restore.key" > "$D/recipient" 2>/dev/null
cat > "$D/policies/bench.toml" <<TOML
[source]
type = "volume"
path = "$D/src"
[repository]
url = "file://$D/veza-repo"
[encryption]
recipients = ["$(cat "$D/recipient")"]
TOML
export RESTIC_PASSWORD=bench RESTIC_REPOSITORY="$D/restic-repo"
restic init --quiet >/dev/null

# run NAME CMD... -> sets WALL and RSS (KiB) from /usr/bin/time
run() {
  local name=$1; shift
  sync
  /usr/bin/time -f "%e %M" -o "$D/time.$name" "$@" >"$D/out.$name" 2>"$D/err.$name" || { echo "$name failed:" >&2; cat "$D/err.$name" >&2; exit 1; }
  read -r WALL RSS < "$D/time.$name"
}
VZ="$V --policies $D/policies --state-dir $D/state"

run v_first $VZ backup bench --full;      VF=$WALL VFR=$RSS; VB=$(du -sb "$D/veza-repo" | cut -f1)
run r_first restic backup --quiet "$D/src"; RF=$WALL RFR=$RSS; RB=$(du -sb "$D/restic-repo" | cut -f1)
run v_again $VZ backup bench;             VA=$WALL VAR=$RSS; VB2=$(du -sb "$D/veza-repo" | cut -f1)
run r_again restic backup --quiet "$D/src"; RA=$WALL RAR=$RSS; RB2=$(du -sb "$D/restic-repo" | cut -f1)
run v_restore $VZ restore bench --target "$D/v-restored" --identity "$D/restore.key"; VR=$WALL VRR=$RSS
run r_restore restic restore latest --quiet --target "$D/r-restored"; RR=$WALL RRR=$RSS

diff -r "$D/src" "$D/v-restored" >/dev/null && echo "veza-dr restore: identical to source" >&2
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
mib() { awk -v a="$1" 'BEGIN { printf "%.0f", a / 1048576 }'; }
echo
echo "tree: ${MIB} MiB, ${FILES} files; $(nproc) cores; restic $(restic version | awk '{print $2}'); local repositories; warm page cache"
printf "%-18s %10s %10s %8s %12s %12s %8s %12s %12s\n" "operation" "veza-dr s" "restic s" "ratio" "veza MiB" "restic MiB" "ratio" "veza RSS" "restic RSS"
printf "%-18s %10s %10s %8s %12s %12s %8s %12s %12s\n" "first backup" "$VF" "$RF" "$(ratio "$VF" "$RF")" "$(mib "$VB")" "$(mib "$RB")" "$(ratio "$VB" "$RB")" "$((VFR/1024)) MiB" "$((RFR/1024)) MiB"
printf "%-18s %10s %10s %8s %12s %12s %8s %12s %12s\n" "unchanged re-run" "$VA" "$RA" "$(ratio "$VA" "$RA")" "+$(mib $((VB2-VB)))" "+$(mib $((RB2-RB)))" "-" "$((VAR/1024)) MiB" "$((RAR/1024)) MiB"
printf "%-18s %10s %10s %8s %12s %12s %8s %12s %12s\n" "restore" "$VR" "$RR" "$(ratio "$VR" "$RR")" "-" "-" "-" "$((VRR/1024)) MiB" "$((RRR/1024)) MiB"
