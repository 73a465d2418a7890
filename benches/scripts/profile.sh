#!/bin/bash
# Samples the machine with perf while `bench write` runs, then breaks the samples down by
# process and, for each server node and the harness, by symbol.
#
#   benches/scripts/profile.sh CLIENTS [OUT_DIR] [BENCH_ARGS...]
#   CALLGRAPH=1 benches/scripts/profile.sh CLIENTS [OUT_DIR] [BENCH_ARGS...]
#
# The run measures for 20 s after a 2 s warm-up; perf samples 10 s from 6 s in, well inside
# the measured window. The node with the most CPU in the 2 s before sampling is the leader (it
# does the client RPC, the proposing and the fan-out to followers).
#
# Plain mode samples every CPU (-a) and reports self time by symbol. CALLGRAPH=1 samples only
# the leader, one follower and the harness, with DWARF call graphs (release builds have no frame
# pointers), and also writes each one's inclusive time by function (`*-inclusive.txt`) and a
# caller tree of its hottest symbols (`*-callers.txt`): where each part's time comes from.
# Needs perf (linux-perf) and a build of `bench` and the server, release by default
# (`cargo build --release -p bench -p server -p client`); PROFILE=dist profiles the build that
# is installed and measured (`cargo build --profile dist ...`).
set -euo pipefail
clients=${1:?usage: profile.sh CLIENTS [OUT_DIR] [BENCH_ARGS...]}
out=${2:-/tmp/cellchat-profile-$clients}
shift $(($# >= 2 ? 2 : 1))
target=${CARGO_TARGET_DIR:-$(dirname "$0")/../../target}
bench=$target/${PROFILE:-release}/bench
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
sleep 2
# Busiest first: the leader.
mapfile -t servers < <(for pid in "${servers[@]}"; do
  echo "$(( $(ticks "$pid") - before[$pid] )) $pid"; done | sort -rn | awk '{ print $2 }')
if [ "${CALLGRAPH:-0}" = 1 ]; then
  # The leader, one follower (if the cluster has one) and the harness.
  pids=$(IFS=,; echo "${servers[*]:0:2},$bench_pid")
  perf record -F 499 --call-graph dwarf,16384 -p "$pids" \
    -o "$out/perf.data" -- sleep 10 2> "$out/perf.err"
else
  perf record -F 1999 -a -o "$out/perf.data" -- sleep 10 2> "$out/perf.err"
fi
wait "$bench_pid"

perf report -i "$out/perf.data" --stdio --no-inline --sort comm,dso --percent-limit 0.5 \
  > "$out/by-process.txt" 2>/dev/null
# One report per part: self time by symbol and, with call graphs, inclusive time and callers.
report() {
  local name=$1
  shift
  perf report -i "$out/perf.data" --stdio --no-inline "$@" --no-children --sort dso,sym --percent-limit 0.4 \
    -g none > "$out/$name.txt" 2>/dev/null || true
  if [ "${CALLGRAPH:-0}" = 1 ]; then
    perf report -i "$out/perf.data" --stdio --no-inline "$@" --children --sort sym --percent-limit 2 \
      -g none > "$out/$name-inclusive.txt" 2>/dev/null || true
    perf report -i "$out/perf.data" --stdio --no-inline "$@" --no-children --sort sym --percent-limit 1.5 \
      -g caller,0.5,callee,function,percent --max-stack 16 > "$out/$name-callers.txt" \
      2>/dev/null || true
  fi
}
report "leader-${servers[0]}" --pid "${servers[0]}"
if [ "${CALLGRAPH:-0}" = 1 ]; then
  if [ "${#servers[@]}" -gt 1 ]; then report "follower-${servers[1]}" --pid "${servers[1]}"; fi
else
  for pid in "${servers[@]:1}"; do report "follower-$pid" --pid "$pid"; done
fi
# By pid: the harness's threads are named after tokio's workers, not after the process.
report harness --pid "$bench_pid"
cat "$out/bench.json"
echo "profiles in $out"
