# Helpers shared by the benchmark scripts (sourced, not run).
# shellcheck shell=bash

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$bench_dir/../.." && pwd)
scratch=$bench_dir/.scratch
run_bin=$repo/pgcoord-run

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

# The benchmarks need a server: scripts/pg-tmp run sets PGHOST and PGPORT.
[[ -n ${PGHOST:-} && -n ${PGPORT:-} ]] \
  || die "no database in the environment; run me as: scripts/pg-tmp run $0"
[[ -x $run_bin ]] || die "$run_bin is missing; run make all"

# Newest /usr/lib/postgresql/<ver>/bin, unless PG_BINDIR says otherwise.
pg_bindir=${PG_BINDIR:-$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}
[[ -x $pg_bindir/pgbench ]] || pg_bindir=$(dirname "$(command -v pgbench || echo /nonexistent/x)")
[[ -x $pg_bindir/pgbench ]] || die "pgbench not found (set PG_BINDIR)"
# shellcheck disable=SC2034 # used by the scripts that source this file
pgbench=$pg_bindir/pgbench
# psql_q ARGS...: psql, quiet, unaligned, stopping at the first error.
psql_q() { "$pg_bindir/psql" -X -q -v ON_ERROR_STOP=1 -At "$@"; }

mkdir -p "$scratch"

# Background processes we started, ended on exit.
bg_pids=()
bench_cleanup() {
  local pid
  for pid in "${bg_pids[@]}"; do stop_pid "$pid"; done
  return 0
}
trap bench_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# stop_pid PID: SIGTERM, then SIGKILL if it has not gone within 3 s.
stop_pid() {
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 30; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# start_bg OUT CMD...: runs CMD in the background, stdout and stderr to OUT,
# ended on exit; its pid in $bg_pid.  OUT is emptied here first: `cmd >OUT &`
# truncates it inside the background job, maybe after a wait_for_line has
# read an earlier run's line from it.  Call it in this shell, not in $(...),
# or bench_cleanup never learns the pid.
start_bg() {
  local out=$1
  shift
  : >"$out"
  "$@" >"$out" 2>&1 &
  bg_pid=$!
  bg_pids+=("$bg_pid")
}

# wait_for_line FILE PATTERN SECONDS: waits until FILE has a line matching
# PATTERN (grep -E); prints it.  Start FILE's writer with start_bg.
wait_for_line() {
  local file=$1 pattern=$2 limit=$3 i
  for ((i = 0; i < limit * 20; i++)); do
    if grep -Eq "$pattern" "$file" 2>/dev/null; then
      grep -E "$pattern" "$file" | tail -n 1
      return 0
    fi
    sleep 0.05
  done
  return 1
}

# count_lines VAR PREFIX FILE: sets VAR to how many lines of FILE start
# with PREFIX, and pause SECONDS sleeps: with builtins only, for loops that
# poll while measured processes work (a grep, a $(...) or a sleep is a
# process forked each time; read times out on a pipe no one writes to).
count_lines() {
  local -n count_lines_n=$1
  local line
  count_lines_n=0
  while IFS= read -r line; do
    [[ $line != "$2"* ]] || count_lines_n=$((count_lines_n + 1))
  done <"$3"
}
pause() {
  [[ -n ${pause_fd:-} ]] || exec {pause_fd}<> <(:)
  read -rt "$1" -u "$pause_fd" || true
}

# smaps PID: prints "PRIVATE_DIRTY_KB RSS_KB" from /proc/PID/smaps_rollup.
smaps() {
  awk '/^Rss:/ { rss = $2 } /^Private_Dirty:/ { pd = $2 }
       END { if (rss == "") exit 1; print pd + 0, rss + 0 }' "/proc/$1/smaps_rollup"
}

# field LINE NAME: the value of NAME=value in a line of key=value pairs.
field() {
  tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p" | head -n 1
}

# Floating-point helpers.
calc() { awk "BEGIN { printf \"%.${2:-2}f\", $1 }"; }
max() { awk -v a="$1" -v b="$2" 'BEGIN { print (a + 0 > b + 0) ? a : b }'; }
# median V...: the middle value (the mean of the middle two for an even count).
median() {
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 }
    END { if (NR == 0) exit 1; m = int((NR + 1) / 2);
          printf "%s", (NR % 2) ? v[m] : (v[m] + v[m + 1]) / 2 }'
}
kb_mb() { awk -v k="$1" 'BEGIN { printf "%d kB (%.2f MB)", k, k / 1024 }'; }

# verdict VALUE OP TARGET: "ok" or "MISSED" (OP is >=, <= or <).
verdict() {
  [[ $2 == ">=" || $2 == "<=" || $2 == "<" ]] || die "verdict: unknown operator $2"
  if awk -v v="$1" -v t="$3" -v op="$2" \
    'BEGIN { exit !((op == ">=") ? (v + 0 >= t + 0) : (op == "<=") ? (v + 0 <= t + 0) : (v + 0 < t + 0)) }'; then
    echo "ok"
  else
    echo "MISSED"
  fi
}

# choose_transport: how every connection of the run (pgcoord-run, pgbench,
# psql, the C baseline) reaches the server, through the PG* environment:
#   default      the Unix socket
#   BENCH_TCP=1  plain TCP to 127.0.0.1 (what BENCH_TLS=1 compares with)
#   BENCH_TLS=1  TLS over TCP to localhost, sslmode=require
# Sets $transport (a word for the summary).
choose_transport() {
  local tls=${BENCH_TLS:-0} tcp=${BENCH_TCP:-0} password
  [[ $tls == 0 || $tls == 1 ]] || die "BENCH_TLS must be 0 or 1, got $tls"
  [[ $tcp == 0 || $tcp == 1 ]] || die "BENCH_TCP must be 0 or 1, got $tcp"
  [[ $tls == 0 || $tcp == 0 ]] || die "BENCH_TLS=1 and BENCH_TCP=1 exclude each other"
  transport="unix socket"
  ((tls || tcp)) || return 0
  [[ -n ${PGCOORD_TEST_TCP_DSN:-} ]] || die "PGCOORD_TEST_TCP_DSN is not set (scripts/pg-tmp sets it)"
  password=$(sed -E 's|^[a-z]+://[^:@/]*:([^@]*)@.*|\1|' <<<"$PGCOORD_TEST_TCP_DSN")
  export PGPASSWORD=$password
  if ((tls)); then
    export PGHOST=localhost PGSSLMODE=require
    transport="TLS (sslmode=require)"
  else
    export PGHOST=127.0.0.1 PGSSLMODE=disable
    transport="plain TCP"
  fi
  # the server must agree: a run that silently fell back would mislead
  local ssl
  ssl=$("$pg_bindir/psql" -X -qAt -c "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") \
    || die "cannot connect over $transport"
  [[ $ssl == "$([[ $tls == 1 ]] && echo t || echo f)" ]] || die "the connection is not $transport"
}

# listen_baseline: the path of the C LISTEN loop (listen-baseline.c),
# built into the scratch directory when missing or older than its source.
listen_baseline() {
  local bin=$scratch/listen-baseline
  if [[ ! -x $bin || $bench_dir/listen-baseline.c -nt $bin ]]; then
    # shellcheck disable=SC2046
    cc -O2 -Wall -Wextra -Werror -o "$bin" "$bench_dir/listen-baseline.c" \
      $(pkg-config --cflags --libs libpq) || die "cannot build listen-baseline"
  fi
  echo "$bin"
}

# pgss_setup [required]: sets pgss=1 when pg_stat_statements is loaded (and
# its extension made), else 0.  BENCH_PGSS=1, or `required` (a script whose
# figures come from it: then pgss is 1 or the script dies), restarts this
# throwaway cluster with it preloaded first.
pgss_setup() {
  local wanted=${BENCH_PGSS:-0}
  [[ ${1:-} == required ]] && wanted=1
  if [[ $wanted == 1 && $(psql_q -c "SHOW shared_preload_libraries") != *pg_stat_statements* ]]; then
    psql_q -c "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'" >/dev/null \
      || die "cannot preload pg_stat_statements"
    "$repo/scripts/pg-tmp" ctl restart || die "cannot restart the cluster"
  fi
  pgss=0
  [[ $(psql_q -c "SHOW shared_preload_libraries") == *pg_stat_statements* ]] && pgss=1
  ((pgss == 0)) || psql_q -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" >/dev/null \
    || die "cannot create the pg_stat_statements extension"
  [[ ${1:-} != required || $pgss == 1 ]] || die "pg_stat_statements is not loaded"
}

# ---- make bench: BENCH_QUICK and the one summary table -----------------------
# BENCH_QUICK=1: a short pass (smaller sizes, one round) of every script.
quick=${BENCH_QUICK:-0}
[[ $quick == 0 || $quick == 1 ]] || die "BENCH_QUICK must be 0 or 1, got $quick"
# sized FULL QUICK: FULL, or QUICK under BENCH_QUICK=1 (a default only: the
# script's own BENCH_* variable still wins).
sized() { if ((quick)); then echo "$2"; else echo "$1"; fi; }

# Every figure with a target (and some for context) goes to a results file,
# one tab-separated line each, which scripts/bench/summary prints as one table:
#   bench  figure  unit  pgcoord  baseline  ratio  target  verdict
# BENCH_RESULTS names the file (default build/bench/results.tsv); a script
# drops the lines its earlier runs left there when it starts.
results_file=${BENCH_RESULTS:-$repo/build/bench/results.tsv}
bench_name=$(basename "$0")
mkdir -p "$(dirname "$results_file")"
touch "$results_file"
awk -F'\t' -v b="$bench_name" '$1 != b' "$results_file" >"$results_file.tmp"
mv "$results_file.tmp" "$results_file"

# result FIGURE UNIT PGCOORD BASELINE TARGET: one line of the table.
# BASELINE is "-" when there is none.  TARGET is "-" (for context), or
# "OP X" (OP >=, <= or <), checked against the ratio PGCOORD / BASELINE, or
# against PGCOORD itself when there is no baseline.
result() {
  local figure=$1 unit=$2 value=$3 base=$4 target=$5 ratio=- checked verdict=-
  [[ -n $value ]] || die "result $figure: no value"
  checked=$value
  if [[ $base != - ]]; then
    if awk -v b="$base" 'BEGIN { exit !(b + 0 == 0) }'; then
      ratio=- checked=
    else
      ratio=$(calc "$value / $base") checked=$ratio
    fi
  fi
  if [[ $target != - ]]; then
    if [[ -z $checked ]]; then verdict=MISSED # (a baseline of 0: nothing to compare)
    else verdict=$(verdict "$checked" "${target%% *}" "${target#* }"); fi
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$bench_name" "$figure" "$unit" "$value" "$base" \
    "$ratio" "$target" "$verdict" >>"$results_file"
}
