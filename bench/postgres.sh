#!/usr/bin/env bash
# veza-dr vs pgBackRest on one PostgreSQL 15 cluster, same machine, same run, local repositories.
#   bench/postgres.sh [SCALE]      (pgbench scale, default 100; BENCH_DIR for the scratch space)
# Dataset: pgbench (scale 100 ≈ 1.6 GB) + ~1 GB of realistic rows (random hex text, ~2x
# compressible) + an append-only events table. Between the full and the incremental: 60 s of
# pgbench (2 clients) mixed with inserts into events. pgBackRest: zst, aes-256-cbc,
# process-max=2. Both run as the postgres user; both archive every segment.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-100}
D=${BENCH_DIR:-/tmp/veza-pgbench}
BIN=/usr/lib/postgresql/15/bin
export DEBIAN_FRONTEND=noninteractive
dpkg -s pgbackrest >/dev/null 2>&1 || apt-get install -y -q pgbackrest >/dev/null
cargo build --release --quiet --bin veza-dr
V=$PWD/target/release/veza-dr
PORT=55990; RPORT1=55991; RPORT2=55992
SOCK=/tmp/vzb-sock
as_pg() { runuser -u postgres -- "$@"; }
cleanup() {
  for d in "$D/pgdata" "$D/restore-vz" "$D/restore-br"; do [ -d "$d" ] && as_pg $BIN/pg_ctl -D "$d" -m immediate stop >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
cleanup
rm -rf "$D" "$SOCK"; mkdir -p "$D" "$SOCK"; chown postgres "$D" "$SOCK"; chmod 755 "$D"
cp "$V" "$D/veza-dr"; V=$D/veza-dr

as_pg $V keygen -o "$D/restore.key" > "$D/recipient" 2>/dev/null
mkdir -p "$D/policies"
cat > "$D/policies/db.toml" <<TOML
[source]
type = "postgres"
method = "physical"
dsn = "env:VEZA_PG_DSN"
data-dir = "$D/pgdata"
[repository]
url = "file://$D/veza-repo"
[encryption]
recipients = ["$(cat "$D/recipient")"]
TOML
sed "s#veza-repo#veza-repo-wal#" "$D/policies/db.toml" > "$D/policies/walbench.toml"
chown -R postgres "$D"
cat > "$D/pgbackrest.conf" <<CONF
[global]
repo1-path=$D/pgbr-repo
repo1-cipher-type=aes-256-cbc
repo1-cipher-pass=bench-cipher-pass
compress-type=zst
process-max=2
start-fast=y
log-level-console=warn
log-level-file=off
lock-path=$D/pgbr-lock
spool-path=$D/pgbr-spool
[bench]
pg1-path=$D/pgdata
pg1-socket-path=$SOCK
pg1-port=$PORT
CONF
chown postgres "$D/pgbackrest.conf"
BR="pgbackrest --config=$D/pgbackrest.conf --stanza=bench"
export VEZA_PG_DSN="host=$SOCK port=$PORT user=postgres dbname=postgres"
export PGHOST=$SOCK PGPORT=$PORT PGUSER=postgres

echo "creating the cluster and the dataset (scale $SCALE) ..." >&2
as_pg $BIN/initdb --no-sync -D "$D/pgdata" -U postgres -A trust >/dev/null
cat >> "$D/pgdata/postgresql.conf" <<CONF
port = $PORT
unix_socket_directories = '$SOCK'
listen_addresses = ''
wal_level = replica
archive_mode = on
archive_command = '$V --policies $D/policies wal-push db %p && $BR archive-push %p'
max_wal_size = 4GB
checkpoint_timeout = 30min
shared_buffers = 512MB
CONF
as_pg env VEZA_PG_DSN="$VEZA_PG_DSN" $BIN/pg_ctl -D "$D/pgdata" -l "$D/pg.log" -w start >/dev/null
as_pg $BR stanza-create >/dev/null
$BIN/pgbench -q -i -s "$SCALE" postgres >/dev/null 2>&1
$BIN/psql -q -X postgres <<SQL
CREATE TABLE docs (id bigint PRIMARY KEY, title text, body text);
INSERT INTO docs SELECT g, md5(g::text), md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text)
  FROM generate_series(1, 4000000) g;
CREATE TABLE events (id bigserial PRIMARY KEY, at timestamptz DEFAULT now(), kind text, payload text);
INSERT INTO events (kind, payload) SELECT 'seed', md5(g::text) FROM generate_series(1, 500000) g;
CHECKPOINT;
SQL
$BIN/psql -qAtX -c "select pg_switch_wal()" postgres >/dev/null
DBSIZE=$($BIN/psql -qAtX -c "select pg_size_pretty(pg_database_size('postgres'))" postgres)

# run NAME CMD... -> WALL, RSS (KiB)
run() {
  local name=$1; shift
  sync
  /usr/bin/time -f "%e %M" -o "$D/time.$name" "$@" >"$D/out.$name" 2>"$D/err.$name" || { echo "$name failed:" >&2; tail -5 "$D/err.$name" >&2; exit 1; }
  read -r WALL RSS < "$D/time.$name"
}
size() { du -sb "$@" 2>/dev/null | awk '{s+=$1} END {print s+0}'; }
VZ="$V --policies $D/policies --state-dir $D/vz-state"

run v_full runuser -u postgres -- env VEZA_PG_DSN="$VEZA_PG_DSN" $VZ backup db --full; VF=$WALL VFR=$RSS
run b_full runuser -u postgres -- $BR --type=full backup; BF=$WALL BFR=$RSS
VFB=$(size "$D/veza-repo/data" "$D/veza-repo/index" "$D/veza-repo/snapshots"); BFB=$(size "$D/pgbr-repo/backup")

echo "workload: 60 s of pgbench + inserts into events ..." >&2
echo "INSERT INTO events (kind, payload) VALUES ('click', md5(random()::text));" > "$D/events.sql"
$BIN/pgbench -n -T 60 -c 2 -j 2 -b tpcb-like@5 -f "$D/events.sql@5" postgres > "$D/pgbench.out" 2>&1
$BIN/psql -qAtX -c "select pg_switch_wal()" postgres >/dev/null

run v_incr runuser -u postgres -- env VEZA_PG_DSN="$VEZA_PG_DSN" $VZ backup db --incremental; VI=$WALL VIR=$RSS
run b_incr runuser -u postgres -- $BR --type=incr backup; BI=$WALL BIR=$RSS
VIB=$(( $(size "$D/veza-repo/data" "$D/veza-repo/index" "$D/veza-repo/snapshots") - VFB )); BIB=$(( $(size "$D/pgbr-repo/backup") - BFB ))

# Restore to a running server (restore + start + end of recovery). The kernel's page-cache
# state swings a 2.7 GB restore by 2x, so the tools alternate twice from a settled machine
# (checkpoint, sync) and each keeps its best run.
settle() { $BIN/psql -qAtX -c "CHECKPOINT" postgres >/dev/null; sync; sleep 3; }
restore_br() {
  $BR --pg1-path="$D/restore-br" restore >/dev/null
  printf "port = $RPORT2\narchive_mode = off\n" >> "$D/restore-br/postgresql.auto.conf"
  $BIN/pg_ctl -D "$D/restore-br" -l "$D/restore-br.log" -w -t 3600 start >/dev/null
  until [ "$($BIN/psql -qAtX -p $RPORT2 -c 'select pg_is_in_recovery()' postgres 2>/dev/null)" = "f" ]; do sleep 0.1; done
}
export -f restore_br; export BR D BIN RPORT2
min() { awk -v a="$1" -v b="$2" 'BEGIN { print (b == "" || a + 0 < b + 0) ? a : b }'; }
VR=""; BRR_W=""; VRR=0; BRR=0
for round in 1 2; do
  for d in restore-vz restore-br; do
    [ -d "$D/$d" ] && runuser -u postgres -- $BIN/pg_ctl -D "$D/$d" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "${D:?}/$d"
  done
  mkdir -p "$D/restore-br"; chown postgres "$D/restore-br"
  settle
  run v_restore runuser -u postgres -- env VEZA_PG_DSN="$VEZA_PG_DSN" $VZ restore db --target "$D/restore-vz" --start --port $RPORT1 --identity "$D/restore.key"
  VR=$(min "$WALL" "$VR"); VRR=$(( RSS > VRR ? RSS : VRR ))
  settle
  run b_restore runuser -u postgres -- bash -c restore_br
  BRR_W=$(min "$WALL" "$BRR_W"); BRR=$(( RSS > BRR ? RSS : BRR ))
done
CHECK_V=$($BIN/psql -qAtX -h /tmp/.veza-dr-$RPORT1 -p $RPORT1 -c "select count(*) from pgbench_history" postgres)
CHECK_B=$($BIN/psql -qAtX -p $RPORT2 -c "select count(*) from pgbench_history" postgres)
[ "$CHECK_V" = "$CHECK_B" ] || echo "WARNING: restored servers differ: veza $CHECK_V rows vs pgbackrest $CHECK_B" >&2

# wal-push per segment: fresh copies of 16 archived segments into fresh repositories.
mkdir -p "$D/segs"; ls "$D/pgdata/pg_wal" | grep -E '^[0-9A-F]{24}$' | tail -17 | head -16 | while read -r s; do cp "$D/pgdata/pg_wal/$s" "$D/segs/"; done
chown -R postgres "$D/segs"
NSEG=$(ls "$D/segs" | wc -l)
sed -i "s#repo1-path=$D/pgbr-repo#repo1-path=$D/pgbr-repo-wal#" "$D/pgbackrest.conf"
as_pg $BR stanza-create >/dev/null
push_v() { for s in "$D"/segs/*; do "$V" --policies "$D/policies" wal-push walbench "$s"; done; }
push_b() { for s in "$D"/segs/*; do $BR archive-push "$s"; done; }
export -f push_v push_b; export V
run v_push runuser -u postgres -- bash -c push_v; VP=$WALL VPR=$RSS
run b_push runuser -u postgres -- bash -c push_b; BP=$WALL BPR=$RSS

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
mib() { awk -v a="$1" 'BEGIN { printf "%.0f MiB", a / 1048576 }'; }
per() { awk -v a="$1" -v n="$NSEG" 'BEGIN { printf "%.3f", a / n }'; }
echo
echo "database $DBSIZE (pgbench scale $SCALE + 1 GB docs + events); $(nproc) cores; pgBackRest $(pgbackrest version | awk '{print $2}') zst aes-256-cbc process-max=2; local repositories"
echo "pgbench: $(grep -E '^tps' "$D/pgbench.out" | head -1)"
printf "%-26s %10s %12s %7s %12s %12s %7s %10s %10s\n" operation "veza-dr s" "pgBackRest s" ratio "veza bytes" "pgBR bytes" ratio "veza RSS" "pgBR RSS"
printf "%-26s %10s %12s %7s %12s %12s %7s %10s %10s\n" "full backup" "$VF" "$BF" "$(ratio $VF $BF)" "$(mib $VFB)" "$(mib $BFB)" "$(ratio $VFB $BFB)" "$((VFR/1024)) MiB" "$((BFR/1024)) MiB"
printf "%-26s %10s %12s %7s %12s %12s %7s %10s %10s\n" "incremental backup" "$VI" "$BI" "$(ratio $VI $BI)" "$(mib $VIB)" "$(mib $BIB)" "$(ratio $VIB $BIB)" "$((VIR/1024)) MiB" "$((BIR/1024)) MiB"
printf "%-26s %10s %12s %7s %12s %12s %7s %10s %10s\n" "restore to running server" "$VR" "$BRR_W" "$(ratio $VR $BRR_W)" - - - "$((VRR/1024)) MiB" "$((BRR/1024)) MiB"
printf "%-26s %10s %12s %7s %12s %12s %7s %10s %10s\n" "wal-push per segment" "$(per $VP)" "$(per $BP)" "$(ratio $VP $BP)" - - - "$((VPR/1024)) MiB" "$((BPR/1024)) MiB"
