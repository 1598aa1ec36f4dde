#!/usr/bin/env bash
# Delta restore against a full restore, on one PostgreSQL 15 cluster, in one run.
#   bench/delta.sh [SCALE]      (pgbench scale, default 50; BENCH_DIR for the scratch space)
# A full backup is restored into OLD (the "data directory one hour old"). Then pgbench runs
# TXNS transactions, and an incremental is taken. Timed: a full restore of the incremental
# into an empty directory, then `restore --delta` of it over OLD (files only, no start), and
# once more over the result (nothing differs).
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-50}
TXNS=${TXNS:-20000}
D=${BENCH_DIR:-/tmp/veza-delta}
BIN=/usr/lib/postgresql/15/bin
PORT=55980; SOCK=/tmp/vzd-sock
cargo build --release --quiet --bin veza-dr
as_pg() { runuser -u postgres -- "$@"; }
cleanup() { [ -d "$D/pgdata" ] && as_pg $BIN/pg_ctl -D "$D/pgdata" -m immediate stop >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup
rm -rf "$D" "$SOCK"; mkdir -p "$D/policies" "$SOCK"; chown postgres "$D" "$SOCK"
cp target/release/veza-dr "$D/veza-dr"; V=$D/veza-dr
as_pg $V keygen -o "$D/restore.key" > "$D/recipient" 2>/dev/null
cat > "$D/policies/db.toml" <<TOML
[source]
type = "postgres"
method = "physical"
dsn = "env:VEZA_PG_DSN"
data-dir = "$D/pgdata"
[repository]
url = "file://$D/repo"
[encryption]
recipients = ["$(cat "$D/recipient")"]
TOML
chown -R postgres "$D"
export VEZA_PG_DSN="host=$SOCK port=$PORT user=postgres dbname=postgres" PGHOST=$SOCK PGPORT=$PORT PGUSER=postgres
as_pg $BIN/initdb --no-sync --data-checksums -D "$D/pgdata" -U postgres -A trust >/dev/null
cat >> "$D/pgdata/postgresql.conf" <<CONF
port = $PORT
unix_socket_directories = '$SOCK'
listen_addresses = ''
wal_level = replica
archive_mode = on
archive_command = '$V --policies $D/policies --state-dir $D/state wal-push db %p'
max_wal_size = 4GB
CONF
as_pg env VEZA_PG_DSN="$VEZA_PG_DSN" $BIN/pg_ctl -D "$D/pgdata" -l "$D/pg.log" -w start >/dev/null
$BIN/pgbench -q -i -s "$SCALE" postgres >/dev/null 2>&1
# Steady state before the full backup: a fresh load is rewritten by its first vacuum (hint
# bits, freezing), which would make every page "changed" in the hour after it.
$BIN/psql -q -X -c "VACUUM (FREEZE, ANALYZE)" -c CHECKPOINT postgres
vz() { as_pg env VEZA_PG_DSN="$VEZA_PG_DSN" $V --policies "$D/policies" --state-dir "$D/state" "$@"; }
vz backup db --full >/dev/null
vz restore db --target "$D/old" --identity "$D/restore.key" >/dev/null
$BIN/pgbench -n -c 2 -t $((TXNS / 2)) postgres >/dev/null 2>&1
vz backup db >/dev/null
secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
FULL=$(secs vz restore db --target "$D/fresh" --identity "$D/restore.key")
DELTA_JSON=$(vz --json restore db --target "$D/old" --identity "$D/restore.key" --delta)
DELTA=$(secs vz restore db --target "$D/old" --identity "$D/restore.key" --delta)
# The first delta did the work; time it again on a fresh old copy for a fair figure.
rm -rf "$D/old"; vz restore db --snapshot "$(vz --json snapshots db | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')" --target "$D/old" --identity "$D/restore.key" >/dev/null
DELTA1=$(secs vz restore db --target "$D/old" --identity "$D/restore.key" --delta)
FETCHED=$(echo "$DELTA_JSON" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["delta"]["bytes-fetched"]>>20, d["bytes"]>>20)')
printf "%-44s %9s\n" "step (pgbench scale $SCALE, $TXNS transactions)" "seconds"
printf "%-44s %9.2f\n" "full restore into an empty directory" "$FULL"
printf "%-44s %9.2f   (%.2fx of full; fetched %s of %s MiB)\n" "delta restore over the hour-old directory" "$DELTA1" "$(echo "$DELTA1 / $FULL" | bc -l)" $FETCHED
printf "%-44s %9.2f\n" "delta restore again (nothing differs)" "$DELTA"
