#!/bin/bash
# One `bench` run of issue 15's old/new comparison (RESULTS-issue15.md), with the 1-minute load
# average before and after: issue15-run.sh LABEL old|new BENCH-ARGS...
# OLD_BIN and NEW_BIN name the release dirs of the two builds (each built in its own worktree
# and target dir); results go to $RES (default /tmp/i15/res).
label=$1; build=$2; shift 2
case $build in
  old) B=${OLD_BIN:-/var/cache/cellchat/target-base/release} ;;
  new) B=${NEW_BIN:-/var/cache/cellchat/target-new/release} ;;
  *) echo "usage: $0 LABEL old|new BENCH-ARGS..." >&2; exit 2 ;;
esac
res=${RES:-/tmp/i15/res}
mkdir -p "$res"
out=$res/$label.txt
{ echo "cmd: bench $* ($build)"; echo "start $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  timeout 900 "$B/bench" "$@" --json --out "$res/out-$label" 2>"$res/$label.err"
  echo "end $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"; } > "$out"
