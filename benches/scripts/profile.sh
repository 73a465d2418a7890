#!/bin/bash
# Samples the whole machine with perf while `bench write` runs, then breaks the samples down by
# process and, for each server node and the harness, by symbol.
#
#   benches/scripts/profile.sh CLIENTS [OUT_DIR] [BENCH_ARGS...]
#
# The run measures for 20 s after a 2 s warm-up; perf samples 10 s from 6 s in, well inside
# the measured window. The node with the most samples is the leader (it does the client RPC,
# the proposing and the fan-out to followers). Needs perf (linux-perf) and a release build of
# `bench` and the server (`cargo build --release -p bench -p server -p client`).
set -euo pipefail
clients=${1:?usage: profile.sh CLIENTS [OUT_DIR] [BENCH_ARGS...]}
out=${2:-/tmp/cellchat-profile-$clients}
shift $(($# >= 2 ? 2 : 1))
target=${CARGO_TARGET_DIR:-$(dirname "$0")/../../target}
bench=$target/release/bench
mkdir -p "$out"

"$bench" write --clients "$clients" --duration 20 --warmup 2 --json --out "$out/res" "$@" \
  > "$out/bench.json" 2> "$out/bench.err" &
bench_pid=$!
sleep 6
# This run's server processes (children of the bench), and their CPU ticks so far.
mapfile -t servers < <(pgrep -P "$bench_pid" -x cellchat-server)
ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
declare -A before
for pid in "${servers[@]}"; do before[$pid]=$(ticks "$pid"); done
perf record -F 1999 -a -o "$out/perf.data" -- sleep 10 2> "$out/perf.err"
# Busiest first: the leader.
mapfile -t servers < <(for pid in "${servers[@]}"; do
  echo "$(( $(ticks "$pid") - before[$pid] )) $pid"; done | sort -rn | awk '{ print $2 }')
wait "$bench_pid"

perf report -i "$out/perf.data" --stdio --sort comm,dso --percent-limit 0.5 \
  > "$out/by-process.txt" 2>/dev/null
role=leader
for pid in "${servers[@]}"; do
  perf report -i "$out/perf.data" --stdio --pid "$pid" --sort dso,sym --percent-limit 0.4 \
    > "$out/$role-$pid.txt" 2>/dev/null
  role=follower
done
perf report -i "$out/perf.data" --stdio --comm bench --sort dso,sym --percent-limit 0.4 \
  > "$out/harness.txt" 2>/dev/null || true
cat "$out/bench.json"
echo "profiles in $out"
