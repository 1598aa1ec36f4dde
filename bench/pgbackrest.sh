#!/usr/bin/env bash
# veza-dr, pgBackRest 2.45 (Debian's) and pgBackRest 2.59 (block incremental) side by side on
# one PostgreSQL 15 cluster, in one run, local repositories.
#   VEZA_BENCH_PGBACKREST=/path/to/pgbackrest bench/pgbackrest.sh [SCALE]
#   (pgbench scale, default 100; HOURS=5 hourly incrementals; BENCH_DIR for the scratch space)
# pgBackRest 2.59 is not packaged here: build it from its source (docs/BENCHMARKS.md says how)
# and name the binary in VEZA_BENCH_PGBACKREST; without it the 2.59 column is left out.
# Dataset: pgbench + 3 M documents (random hex, ~2x compressible) + 500k events, frozen and
# checkpointed before the fulls. One "hour": 20k pgbench transactions, 2 % of the recent
# documents and 2,000 old ones edited, 200k events appended, VACUUM. All three tools archive
# every segment (one archive_command); every timed step starts after a checkpoint and an empty
# archive queue, so no tool pays for another's backlog. pgBackRest: zst, aes-256-cbc,
# process-max=2; 2.59 with repo1-bundle=y and repo1-block=y.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-100}
HOURS=${HOURS:-5}
D=${BENCH_DIR:-/tmp/veza-vs-pgbr}
BIN=/usr/lib/postgresql/15/bin
B59=${VEZA_BENCH_PGBACKREST:-}
if [ -z "$B59" ] || [ ! -x "$B59" ]; then
  echo "VEZA_BENCH_PGBACKREST is not set to a pgBackRest 2.59 binary: the 2.59 column is left out" >&2
  B59=""
fi
export DEBIAN_FRONTEND=noninteractive
dpkg -s pgbackrest >/dev/null 2>&1 || apt-get install -y -q pgbackrest >/dev/null
cargo build --release --quiet --bin veza-dr
PORT=55970; RPORT=55971; SOCK=/tmp/vzp-sock
as_pg() { runuser -u postgres -- "$@"; }
stop_all() {
  for d in "$D"/pgdata "$D"/run-*; do [ -d "$d" ] && as_pg $BIN/pg_ctl -D "$d" -m immediate stop >/dev/null 2>&1 || true; done
}
trap stop_all EXIT
stop_all
rm -rf "$D" "$SOCK"; mkdir -p "$D/policies" "$SOCK"; chown postgres "$D" "$SOCK"; chmod 755 "$D"
cp target/release/veza-dr "$D/veza-dr"; V=$D/veza-dr
[ -n "$B59" ] && cp "$B59" "$D/pgbackrest-2.59" && B59=$D/pgbackrest-2.59
as_pg $V keygen -o "$D/restore.key" > "$D/recipient" 2>/dev/null
policy() { # NAME REPO
  printf '[source]\ntype = "postgres"\nmethod = "physical"\ndsn = "env:VEZA_PG_DSN"\ndata-dir = "%s"\n[repository]\nurl = "file://%s"\n[encryption]\nrecipients = ["%s"]\n' \
    "$D/pgdata" "$2" "$(cat "$D/recipient")" > "$D/policies/$1.toml"
}
policy db "$D/vz-repo"; policy walbench "$D/vz-wal"
brconf() { # FILE REPO EXTRA
  printf '[global]\nrepo1-path=%s\nrepo1-cipher-type=aes-256-cbc\nrepo1-cipher-pass=bench-cipher-pass\ncompress-type=zst\nprocess-max=2\nstart-fast=y\nlog-level-console=warn\nlog-level-file=off\nlock-path=%s.lock\nspool-path=%s.spool\n%s[bench]\npg1-path=%s\npg1-socket-path=%s\npg1-port=%s\n' \
    "$2" "$1" "$1" "$3" "$D/pgdata" "$SOCK" "$PORT" > "$1"
}
brconf "$D/br45.conf" "$D/br45-repo" ""
brconf "$D/br59.conf" "$D/br59-repo" $'repo1-bundle=y\nrepo1-block=y\n'
chown -R postgres "$D"
B45="pgbackrest --config=$D/br45.conf --stanza=bench"
B59C=${B59:+$B59 --config=$D/br59.conf --stanza=bench}
VZ="$V --policies $D/policies --state-dir $D/vz-state"
# One archive_command for the three; pgBackRest's archive check wants its name in it.
cat > "$D/archive-pgbackrest.sh" <<SH
#!/bin/sh
set -e
$VZ wal-push db "\$1"
$B45 archive-push "\$1"
${B59C:+$B59C archive-push "\$1"}
SH
chmod 755 "$D/archive-pgbackrest.sh"
export VEZA_PG_DSN="host=$SOCK port=$PORT user=postgres dbname=postgres" PGHOST=$SOCK PGPORT=$PORT PGUSER=postgres

echo "creating the cluster and the dataset (scale $SCALE) ..." >&2
as_pg $BIN/initdb --no-sync --data-checksums -D "$D/pgdata" -U postgres -A trust >/dev/null
cat >> "$D/pgdata/postgresql.conf" <<CONF
port = $PORT
unix_socket_directories = '$SOCK'
listen_addresses = ''
wal_level = replica
archive_mode = on
archive_command = '$D/archive-pgbackrest.sh %p'
max_wal_size = 4GB
checkpoint_timeout = 30min
shared_buffers = 512MB
CONF
as_pg env VEZA_PG_DSN="$VEZA_PG_DSN" $BIN/pg_ctl -D "$D/pgdata" -l "$D/pg.log" -w start >/dev/null
as_pg $B45 stanza-create >/dev/null
[ -n "$B59" ] && as_pg $B59C stanza-create >/dev/null
$BIN/pgbench -q -i -s "$SCALE" postgres >/dev/null 2>&1
NDOCS=$((SCALE * 30000))
$BIN/psql -q -X postgres <<SQL
CREATE TABLE docs (id bigint PRIMARY KEY, title text, body text);
INSERT INTO docs SELECT g, md5(g::text), md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text)
  FROM generate_series(1, $NDOCS) g;
CREATE TABLE events (id bigserial PRIMARY KEY, at timestamptz DEFAULT now(), kind text, payload text);
INSERT INTO events (kind, payload) SELECT 'seed', md5(g::text) FROM generate_series(1, $((SCALE * 5000))) g;
VACUUM (FREEZE, ANALYZE);
SQL
DBSIZE=$($BIN/psql -qAtX -c "select pg_size_pretty(pg_database_size('postgres'))" postgres)

# Checkpoint, switch, and wait until every ready segment is archived by all three.
quiesce() {
  $BIN/psql -qAtX -c "CHECKPOINT" -c "SELECT pg_switch_wal()" postgres >/dev/null
  while ls "$D/pgdata/pg_wal/archive_status/" 2>/dev/null | grep -q '\.ready$'; do sleep 0.2; done
  sync
}
# run NAME CMD... -> WALL (s), RSS (KiB); keeps the peak RSS per tool (the name's prefix).
declare -A PEAK
run() {
  local name=$1; shift
  quiesce
  /usr/bin/time -f "%e %M" -o "$D/time.$name" "$@" >"$D/out.$name" 2>"$D/err.$name" || { echo "$name failed:" >&2; tail -5 "$D/err.$name" >&2; exit 1; }
  read -r WALL RSS < "$D/time.$name"
  local tool=${name%%_*}
  PEAK[$tool]=$(( RSS > ${PEAK[$tool]:-0} ? RSS : ${PEAK[$tool]:-0} ))
}
size() { { du -sb "$@" 2>/dev/null || true; } | awk '{s+=$1} END {printf "%.0f\n", s}'; }
vz_bytes() { size "$D/vz-repo/data" "$D/vz-repo/index" "$D/vz-repo/snapshots"; }
br_bytes() { size "$D/$1-repo/backup"; }
bytes() { case $1 in vz) vz_bytes ;; *) br_bytes "$1" ;; esac; }
TOOLS="vz br45"; [ -n "$B59" ] && TOOLS="vz br45 br59"
backup() { # TOOL full|incr
  case $1 in
    vz) run "vz_$2" runuser -u postgres -- env VEZA_PG_DSN="$VEZA_PG_DSN" $VZ backup db "--$([ "$2" = full ] && echo full || echo incremental)" ;;
    br45) run "br45_$2" runuser -u postgres -- $B45 --type="$2" backup ;;
    br59) run "br59_$2" runuser -u postgres -- $B59C --type="$2" backup ;;
  esac
}
declare -A FULL_S FULL_B INC_S INC_B CHAIN_B
for t in $TOOLS; do b0=$(bytes $t); backup $t full; FULL_S[$t]=$WALL; FULL_B[$t]=$(( $(bytes $t) - b0 )); done
# Each tool's full backup, restored again after the hours (files only): no page layers there.
SET_vz=$(as_pg $VZ snapshots db --json | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["id"])')
SET_br45=$(as_pg $B45 info | awk '/full backup/ {print $3; exit}')
SET_br59=; [ -n "$B59" ] && SET_br59=$(as_pg $B59C info | awk '/full backup/ {print $3; exit}')

hour() {
  $BIN/pgbench -n -c 2 -j 2 -t 10000 postgres > "$D/pgbench.out" 2>&1
  $BIN/psql -q -X postgres <<SQL
UPDATE docs SET body = md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text)
  WHERE id > $((NDOCS * 9 / 10)) AND random() < 0.02;
UPDATE docs SET title = md5(random()::text) WHERE id IN (SELECT 1 + (random() * $((NDOCS * 9 / 10)))::bigint FROM generate_series(1, 2000));
INSERT INTO events (kind, payload) SELECT 'click', md5(random()::text) FROM generate_series(1, 200000);
VACUUM;
SQL
}
# A directory one hour old per tool: its second-to-last backup restored (files only).
old_copy() { # TOOL DIR
  rm -rf "$2"; mkdir -p "$2"; chown postgres "$2"
  case $1 in
    vz) as_pg $VZ restore db --target "$2" --identity "$D/restore.key" >/dev/null ;;
    br45) as_pg $B45 --pg1-path="$2" restore >/dev/null ;;
    br59) as_pg $B59C --pg1-path="$2" restore >/dev/null ;;
  esac
}
for h in $(seq 1 "$HOURS"); do
  echo "hour $h of $HOURS ..." >&2
  if [ "$h" = "$HOURS" ]; then for t in $TOOLS; do old_copy $t "$D/old-$t"; done; fi
  hour
  for t in $TOOLS; do
    b0=$(bytes $t); backup $t incr; b=$(( $(bytes $t) - b0 ))
    CHAIN_B[$t]=$(( ${CHAIN_B[$t]:-0} + b ))
    if [ "$h" = 1 ]; then INC_S[$t]=$WALL; INC_B[$t]=$b; fi
  done
done

# Restores of the newest backup. Files only into an empty directory, then --delta over the
# hour-old copy; then to a running server (restore + start + end of recovery), best of three,
# tools alternating so that none inherits the other's page cache.
files_restore() { # TOOL DIR [--delta]
  case $1 in
    vz) as_pg $VZ restore db --target "$2" --identity "$D/restore.key" ${3:-} ;;
    br45) as_pg $B45 --pg1-path="$2" restore ${3:-} ;;
    br59) as_pg $B59C --pg1-path="$2" restore ${3:-} ;;
  esac
}
full_restore() { # TOOL DIR
  case $1 in
    vz) as_pg $VZ restore db --snapshot "$SET_vz" --target "$2" --identity "$D/restore.key" ;;
    br45) as_pg $B45 --pg1-path="$2" --set="$SET_br45" restore ;;
    br59) as_pg $B59C --pg1-path="$2" --set="$SET_br59" restore ;;
  esac
}
export -f files_restore full_restore as_pg; export VZ B45 B59C D SET_vz SET_br45 SET_br59
declare -A FILES_S DELTA_S RUN_S FULLR_S
for t in $TOOLS; do
  rm -rf "$D/new-$t" "$D/full-$t"; mkdir -p "$D/new-$t" "$D/full-$t"; chown postgres "$D/new-$t" "$D/full-$t"
  run "${t}_files" bash -c "files_restore $t $D/new-$t"; FILES_S[$t]=$WALL
  run "${t}_delta" bash -c "files_restore $t $D/old-$t --delta"; DELTA_S[$t]=$WALL
  run "${t}_fullr" bash -c "full_restore $t $D/full-$t"; FULLR_S[$t]=$WALL
  rm -rf "$D/new-$t" "$D/full-$t"
done
start_restore() { # TOOL DIR PORT
  case $1 in
    vz) as_pg $VZ restore db --target "$2" --identity "$D/restore.key" --start --port "$3" ;;
    *) files_restore "$1" "$2"
       printf "port = %s\narchive_mode = off\nunix_socket_directories = '%s'\n" "$3" "$SOCK" >> "$2/postgresql.auto.conf"
       as_pg $BIN/pg_ctl -D "$2" -l "$2.log" -w -t 3600 start >/dev/null
       until [ "$($BIN/psql -qAtX -h "$SOCK" -p "$3" -c 'select pg_is_in_recovery()' postgres 2>/dev/null)" = "f" ]; do sleep 0.1; done ;;
  esac
}
export -f start_restore; export BIN SOCK
min() { awk -v a="$1" -v b="$2" 'BEGIN { print (b == "" || a + 0 < b + 0) ? a : b }'; }
# Best of three, each tool first once: on this disk (ext4 without a journal) the first restore
# after a large deletion pays for it, so a fixed order charged the first tool in every round.
read -ra ORDER <<< "$TOOLS"
for round in 0 1 2; do
  rm -rf "$D"/run-*; sync
  for i in "${!ORDER[@]}"; do
    t=${ORDER[$(( (i + round) % ${#ORDER[@]} ))]}
    mkdir -p "$D/run-$t"; chown postgres "$D/run-$t"
    run "${t}_run" bash -c "start_restore $t $D/run-$t $RPORT"
    RUN_S[$t]=$(min "$WALL" "${RUN_S[$t]:-}")
    as_pg $BIN/pg_ctl -D "$D/run-$t" -m immediate stop >/dev/null 2>&1 || true
  done
done

# wal-push per segment, timed one by one as PostgreSQL would see it: 16 segments the cluster
# archived, pushed into fresh repositories with the cluster stopped (its archiver is quiet).
# archive_command as PostgreSQL sees it, one tool at a time, while a bulk load writes about
# 32 segments; a wrapper times each call. veza-dr's look-ahead serves only when segments wait
# behind the one being archived (here the archiver kept up in the runs so far, so it did not);
# pgBackRest runs as configured above (archive-push synchronous, its default). veza-dr's
# wal-tail (started by its wal-push, compressing the segment being written) is stopped before
# each tool's turn, so it works only for veza-dr's own.
declare -A ARCH_MED ARCH_P95
for t in $TOOLS; do
  pkill -f -- "$V .*wal-tail" || true
  case $t in
    vz) cmd="$VZ wal-push db" ;;
    br45) cmd="$B45 archive-push" ;;
    br59) cmd="$B59C archive-push" ;;
  esac
  cat > "$D/timed-$t.sh" <<SH
#!/bin/sh
t0=\$(date +%s%N); $cmd "\$1"; rc=\$?; echo \$(( (\$(date +%s%N) - t0) / 1000 )) >> $D/arch.$t; exit \$rc
SH
  chmod 755 "$D/timed-$t.sh"; : > "$D/arch.$t"; chown postgres "$D/arch.$t"
  $BIN/psql -qAtX -c "ALTER SYSTEM SET archive_command = '$D/timed-$t.sh %p'" -c "SELECT pg_reload_conf()" postgres >/dev/null
  sleep 1
  $BIN/psql -qAtX -c "INSERT INTO events (kind, payload) SELECT 'bulk', repeat(md5(g::text), 6) FROM generate_series(1, 1500000) g" -c "SELECT pg_switch_wal()" postgres >/dev/null
  while ls "$D/pgdata/pg_wal/archive_status/" 2>/dev/null | grep -q '\.ready$'; do sleep 0.2; done
  ARCH_MED[$t]=$(sort -n "$D/arch.$t" | awk '{a[NR]=$1} END {printf "%.4f", a[int((NR+1)/2)] / 1e6}')
  ARCH_P95[$t]=$(sort -n "$D/arch.$t" | awk '{a[NR]=$1} END {i=int(NR*0.95+0.999); if (i > NR) i = NR; printf "%.4f", a[i] / 1e6}')
  echo "archive_command $t: $(wc -l < "$D/arch.$t") segments" >&2
done
$BIN/psql -qAtX -c "ALTER SYSTEM RESET archive_command" -c "SELECT pg_reload_conf()" postgres >/dev/null
pkill -f -- "$V .*wal-tail" || true

# Real segments, written by pgbench after the last checkpoint (a checkpoint recycles them).
$BIN/pgbench -n -c 2 -j 2 -t 15000 postgres > "$D/pgbench-wal.out" 2>&1
$BIN/psql -qAtX -c "SELECT pg_switch_wal()" postgres >/dev/null
while ls "$D/pgdata/pg_wal/archive_status/" 2>/dev/null | grep -q '\.ready$'; do sleep 0.2; done
mkdir -p "$D/segs"
ls "$D/pgdata/pg_wal/archive_status" | sed -n 's/^\([0-9A-F]\{24\}\)\.done$/\1/p' | sort | tail -17 | head -16 | while read -r s; do cp "$D/pgdata/pg_wal/$s" "$D/segs/"; done
chown -R postgres "$D/segs"
sed "s#repo1-path=$D/br45-repo#repo1-path=$D/br45-wal#; s#$D/br45.conf#$D/br45w.conf#g" "$D/br45.conf" > "$D/br45w.conf"
sed "s#repo1-path=$D/br59-repo#repo1-path=$D/br59-wal#; s#$D/br59.conf#$D/br59w.conf#g" "$D/br59.conf" > "$D/br59w.conf"
chown postgres "$D"/br*w.conf
B45W="pgbackrest --config=$D/br45w.conf --stanza=bench"; B59W=${B59:+$B59 --config=$D/br59w.conf --stanza=bench}
as_pg $B45W stanza-create >/dev/null; [ -n "$B59" ] && as_pg $B59W stanza-create >/dev/null
# veza-dr's repository is created before the timing, as pgBackRest's stanza is. Its wal-tail is
# held off (its lock taken): these segments are finished copies, not one PostgreSQL is writing,
# and a tailer compressing the next copy between pushes would do part of the timed work untimed.
as_pg $V --policies "$D/policies" --state-dir "$D/vz-state" init walbench >/dev/null
as_pg install -d -m 700 "$D/vz-state/wal-tail" "$D/vz-state/wal-tail/walbench"
setsid runuser -u postgres -- flock -n "$D/vz-state/wal-tail/walbench/.tail" sleep 3599 &
as_pg $BIN/pg_ctl -D "$D/pgdata" -m fast stop >/dev/null
declare -A PUSH_MED PUSH_P95
for t in $TOOLS; do
  sync
  : > "$D/push.$t"
  for s in "$D"/segs/*; do
    case $t in
      vz) cmd="$V --policies $D/policies --state-dir $D/vz-state wal-push walbench $s" ;;
      br45) cmd="$B45W archive-push $s" ;;
      br59) cmd="$B59W archive-push $s" ;;
    esac
    # Wall time in ms (GNU time's 10 ms steps are too coarse here) and the RSS.
    t0=$(date +%s%N)
    /usr/bin/time -f "%M" -o "$D/rss" runuser -u postgres -- $cmd
    echo "$(( ($(date +%s%N) - t0) / 1000 )) $(cat "$D/rss")" | awk '{printf "%.4f %s\n", $1 / 1e6, $2}' >> "$D/push.$t"
  done
  [ "$(wc -l < "$D/push.$t")" -ge 8 ] || echo "WARNING: only $(wc -l < "$D/push.$t") segments were timed" >&2
  PUSH_MED[$t]=$(awk '{print $1}' "$D/push.$t" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  PUSH_P95[$t]=$(awk '{print $1}' "$D/push.$t" | sort -n | awk '{a[NR]=$1} END {i=int(NR*0.95+0.999); if (i > NR) i = NR; print a[i]}')
  R=$(awk '{print $2}' "$D/push.$t" | sort -n | tail -1); PEAK[$t]=$(( R > ${PEAK[$t]} ? R : ${PEAK[$t]} ))
done

pkill -f -- '^sleep 3599$' || true

mib() { awk -v a="$1" 'BEGIN { printf "%.0f MiB", a / 1048576 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
ref=br59; [ -n "$B59" ] || ref=br45
row() { # LABEL TARGET VALUE-ARRAY-NAME [mib]
  local label=$1 target=$2 arr=$3 fmt=${4:-}; local -n a=$arr
  local cells=() t
  for t in br45 br59 vz; do
    case " $TOOLS " in *" $t "*) ;; *) cells+=("-"); continue ;; esac
    case $fmt in mib) cells+=("$(mib "${a[$t]}")") ;; raw) cells+=("${a[$t]}") ;; *) cells+=("${a[$t]} s") ;; esac
  done
  printf "| %s | %s | %s | %s | %s | %s |\n" "$label" "${cells[0]}" "${cells[1]}" "${cells[2]}" "$(ratio "${a[vz]}" "${a[$ref]}")" "$target"
}
declare -A DRATIO PUSHM PUSHP PEAKM
for t in $TOOLS; do
  DRATIO[$t]=$(ratio "${DELTA_S[$t]}" "${FILES_S[$t]}"); PEAKM[$t]=$(( PEAK[$t] * 1024 ))
done
echo
echo "database $DBSIZE (pgbench scale $SCALE, $NDOCS docs, events), data checksums on; $(nproc) cores; local repositories;"
V59="(2.59 missing)"; [ -n "$B59" ] && V59=$($B59 version | awk '{print $2}')
echo "pgBackRest $(pgbackrest version | awk '{print $2}') and $V59: zst, aes-256-cbc, process-max=2 (2.59: bundle + block); one hour = 20k pgbench transactions, 2 % of recent docs + 2,000 old ones edited, 200k events, VACUUM"
echo
echo "| step | pgBackRest 2.45 | pgBackRest 2.59 | veza-dr | veza-dr / ${ref/br/pgBackRest 2.} | target |"
echo "|---|---|---|---|---|---|"
row "full backup" "≤ 0.33" FULL_S
row "full backup, bytes stored" "" FULL_B mib
row "hourly incremental" "≤ 0.33" INC_S
row "hourly incremental, bytes stored" "≤ 0.5" INC_B mib
row "chain of $HOURS hourly incrementals, bytes stored" "≤ 0.5" CHAIN_B mib
row "restore, files only" "" FILES_S
row "restore of the full backup, files only" "" FULLR_S
row "delta restore over a directory one hour old" "" DELTA_S
row "delta restore / files-only restore" "≤ 0.25 (veza-dr)" DRATIO raw
row "restore to a running server (best of 3)" "≤ 0.5" RUN_S
row "archive_command per segment during a bulk load, median" "≤ 0.33" ARCH_MED
row "archive_command per segment during a bulk load, p95" "≤ 0.33" ARCH_P95
row "wal-push of one segment alone (16 in a row), median" "" PUSH_MED
row "wal-push of one segment alone (16 in a row), p95" "" PUSH_P95
row "peak RSS" "≤ 256 MiB" PEAKM mib
