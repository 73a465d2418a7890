#!/usr/bin/env bash
# The web client's benchmark (benches/web/bench.mjs) on a 3-node cluster of the release
# binaries, started here on loopback and stopped by pid at the end. Builds nothing: it uses
# $CARGO_TARGET_DIR/release/{cellchat-server,bench} (else target/release).
#
#   benches/web/run.sh [--nodelay] [--rounds N] [--loads N] [--messages N] [--rate R]
#
# Prints a Markdown report on stdout; the run's directory (node logs, every sample in
# out/web-bench.json) is removed at the end unless CELLCHAT_KEEP_BENCH_DIR=1.
# Needs node, the packages of tests/web (`PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci` there) and
# Debian's chromium at /usr/bin/chromium.
#
# --nodelay is a diagnostic, not the benchmark: it compiles nodelay.c with cc into the run's
# directory and starts the nodes with it in LD_PRELOAD, which turns on TCP_NODELAY on every
# socket they accept (see nodelay.c for why).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
release=${CARGO_TARGET_DIR:-/var/cache/cellchat/target}/release
[[ -x $release/cellchat-server ]] || release=$root/target/release
server=$release/cellchat-server
bench=$release/bench
for bin in "$server" "$bench"; do
  [[ -x $bin ]] || { echo "run.sh: $bin missing: build it first (cargo build --release -p server -p bench)" >&2; exit 2; }
done
[[ -d $root/tests/web/node_modules/playwright-core ]] ||
  { echo "run.sh: tests/web/node_modules missing: PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci in tests/web" >&2; exit 2; }

preload=""
args=()
for arg in "$@"; do
  if [[ $arg == --nodelay ]]; then preload=yes; else args+=("$arg"); fi
done

dir=$(mktemp -d /tmp/cellchat-web-bench-XXXXXX)
cluster=webbench-$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
discovery_port=$(python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
bench_pid=""

stop_nodes() {
  local pid round
  if [[ -n $bench_pid ]] && kill -0 "$bench_pid" 2>/dev/null; then
    kill -TERM "$bench_pid" 2>/dev/null || true
    for round in $(seq 1 50); do kill -0 "$bench_pid" 2>/dev/null || break; sleep 0.1; done
  fi
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for round in $(seq 1 100); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  if [[ ${CELLCHAT_KEEP_BENCH_DIR:-} == 1 ]]; then
    echo "run.sh: kept $dir" >&2
  else
    rm -rf "$dir"
  fi
}
trap stop_nodes EXIT
trap 'exit 130' INT TERM

env_preload=()
if [[ -n $preload ]]; then
  cc -shared -fPIC -O2 -o "$dir/nodelay.so" "$here/nodelay.c" -ldl
  env_preload=(env "LD_PRELOAD=$dir/nodelay.so")
fi

# The harness's own cluster flags (benches/src/sut/cellchat.rs): rate limits out of the way.
for i in 1 2 3; do
  "${env_preload[@]}" "$server" --data-dir "$dir/node-$i" --data-root "$dir" \
    --cluster "$cluster" --discovery-port "$discovery_port" --formation-window-ms 700 \
    --web 127.0.0.1:0 --log info,openraft=warn,tarpc=warn \
    --user-rate 10000000 --user-burst 10000000 --conn-rate 10000000 --conn-burst 10000000 \
    </dev/null >"$dir/node-$i.out" 2>"$dir/node-$i.log" &
  pids+=($!)
done

webs=()
metrics=()
for i in 1 2 3; do
  url=""
  for round in $(seq 1 600); do
    url=$(sed -n 's/^ready .* web=\([^ ]*\).*/\1/p' "$dir/node-$i.out" | head -n 1)
    [[ -n $url ]] && break
    kill -0 "${pids[$((i - 1))]}" 2>/dev/null || break
    sleep 0.1
  done
  [[ -n $url ]] || { echo "run.sh: node $i did not get ready; its log:" >&2; tail -n 20 "$dir/node-$i.log" >&2; exit 1; }
  webs+=("$url")
  metrics+=("$(sed -n 's/^ready .* metrics=\([^ ]*\).*/\1/p' "$dir/node-$i.out" | head -n 1)")
done

export CELLCHAT_TOKEN
CELLCHAT_TOKEN=$("$server" token --cluster "$cluster" --data-root "$dir" --discovery-port "$discovery_port")

commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git -C "$root" status --porcelain -- web crates bin 2>/dev/null | grep -q . && echo ", with uncommitted changes under web/ crates/ bin/" || true)
echo "### Web client (benches/web) — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo
echo "Command: \`benches/web/run.sh${*:+ $*}\` (commit $commit$dirty; server built $(date -u -r "$server" +%Y-%m-%dT%H:%MZ), $(node --version), $(/usr/bin/chromium --version 2>/dev/null | head -n 1)$([[ -n $preload ]] && echo '; DIAGNOSTIC: nodes run with TCP_NODELAY forced on by LD_PRELOAD'))."
echo
# In the background and waited for, so a signal to this script runs the trap at once.
node "$here/bench.mjs" --web "$(IFS=,; echo "${webs[*]}")" --cluster "$cluster" \
  --discovery-port "$discovery_port" --bench "$bench" --out "$dir/out" \
  --pids "$(IFS=,; echo "${pids[*]}")" --metrics "$(IFS=,; echo "${metrics[*]}")" "${args[@]}" &
bench_pid=$!
wait "$bench_pid"
