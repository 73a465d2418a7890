#!/usr/bin/env python3
"""Issue 15 measurements the bench harness lacks: a leader's disk stall (`stall`) and follower
restarts under load (`prevote`), on a 3-node loopback cluster of the given build.

    issue15.py prevote --bin DIR [--rounds 20]      # any build
    issue15.py stall   --bin DIR [--rounds 10]      # a server built with feature `weaken`

DIR holds `cellchat-server`, `cellchat` and `bench` of one build. Load: that build's
`bench write --join` (16 closed-loop senders). Leader, term and leader-change counters come from
each node's /metrics (cellchat_raft_leader_info, cellchat_raft_term,
cellchat_raft_leader_changes_total). Only processes this script started are signalled, by pid;
its data dirs under /tmp are removed at the end. Traffic stays on 127.0.0.0/8.
"""
import argparse, json, os, random, re, shutil, signal, socket, statistics, subprocess, sys
import time, urllib.request

BENCH_ARGS = ["--user-rate", "10000000", "--user-burst", "10000000",
              "--conn-rate", "10000000", "--conn-burst", "10000000"]


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg():
    return open("/proc/loadavg").read().split()[0]


class Node:
    def __init__(self, cluster, index):
        self.cluster, self.index = cluster, index
        self.dir = os.path.join(cluster.root, f"node-{index}")
        self.proc, self.ready = None, None

    def start(self):
        c = self.cluster
        out = open(os.path.join(c.root, f"node-{self.index}.out"), "w")
        err = open(os.path.join(c.root, f"node-{self.index}.err"), "a")
        self.proc = subprocess.Popen(
            [os.path.join(c.bin, "cellchat-server"), "--data-dir", self.dir,
             "--cluster", c.name, "--discovery-port", str(c.dport),
             "--broadcast", "127.255.255.255", "--host", "127.0.0.1",
             "--bootstrap-expect", "3"] + BENCH_ARGS + c.extra,
            stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self.ready = None

    def wait_ready(self, timeout=60):
        path = os.path.join(self.cluster.root, f"node-{self.index}.out")
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in open(path):
                if line.startswith("ready "):
                    self.ready = dict(kv.split("=", 1) for kv in line.split()[1:])
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.index} exited {self.proc.returncode}")
            time.sleep(0.05)
        raise RuntimeError(f"node {self.index} not ready in {timeout}s")

    def metrics(self):
        try:
            with urllib.request.urlopen(f"http://{self.ready['metrics']}/metrics", timeout=0.5) as r:
                text = r.read().decode()
        except Exception:
            return None
        m = {"id": self.ready["node"]}
        leader = re.search(r'^cellchat_raft_leader_info\{[^}]*leader_id="([^"]*)"', text, re.M)
        m["leader"] = leader.group(1) if leader else None
        for key, name in [("term", "cellchat_raft_term"),
                          ("changes", "cellchat_raft_leader_changes_total"),
                          ("has_leader", "cellchat_raft_has_leader")]:
            v = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)", text, re.M)
            m[key] = float(v.group(1)) if v else None
        return m

    def signal(self, sig):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)


class Cluster:
    def __init__(self, bin_dir, label, extra):
        self.bin, self.extra = bin_dir, extra
        self.name = f"i15-{label}-{os.getpid()}"
        self.dport = free_udp_port()
        self.root = f"/tmp/i15/run-{self.name}"
        os.makedirs(self.root)
        self.nodes = [Node(self, i) for i in (1, 2, 3)]
        self.load = None

    def start(self):
        for n in self.nodes:
            n.start()
        for n in self.nodes:
            n.wait_ready()

    def view(self):
        return [n.metrics() for n in self.nodes]

    def leader(self, timeout=30):
        """(leader id, term) once every reachable node names the same leader."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = [m for m in self.view() if m]
            leaders = {m["leader"] for m in v}
            if len(v) == 3 and len(leaders) == 1 and None not in leaders and "" not in leaders:
                return v[0]["leader"], max(m["term"] for m in v)
            time.sleep(0.05)
        raise RuntimeError(f"no agreed leader in {timeout}s: {self.view()}")

    def index_of(self, node_id):
        return next(i for i, n in enumerate(self.nodes) if n.ready and n.ready["node"] == node_id)

    def start_load(self, clients, seconds):
        out = os.path.join(self.root, "load")
        self.load = subprocess.Popen(
            [os.path.join(self.bin, "bench"), "write", "--join", f"127.0.0.1:{self.dport}",
             "--cluster", self.name, "--discovery-port", str(self.dport),
             "--clients", str(clients), "--duration", str(seconds), "--warmup", "1",
             "--json", "--out", out],
            stdout=open(os.path.join(self.root, "load.out"), "w"),
            stderr=open(os.path.join(self.root, "load.err"), "w"))

    def stop(self):
        if self.load and self.load.poll() is None:
            self.load.send_signal(signal.SIGTERM)
            try:
                self.load.wait(10)
            except subprocess.TimeoutExpired:
                self.load.kill()
        for n in self.nodes:
            n.signal(signal.SIGKILL)
            if n.proc:
                n.proc.wait()

    def history_at_ms(self, channel):
        out = subprocess.run(
            [os.path.join(self.bin, "cellchat"), "reader", "--history", "1000", "--json",
             "--channel", channel, "--cluster", self.name, "--discovery-port", str(self.dport),
             "--config-dir", os.path.join(self.root, "client")],
            capture_output=True, text=True, timeout=30)
        return [json.loads(l)["at_ms"] for l in out.stdout.splitlines() if l.strip()]


def prevote(args, cluster):
    cluster.start()
    leader0, term0 = cluster.leader()
    cluster.start_load(16, args.rounds * 8 + 30)
    time.sleep(3)
    rounds = []
    for r in range(args.rounds):
        leader, term = cluster.leader()
        followers = [i for i, n in enumerate(cluster.nodes) if n.ready["node"] != leader]
        victim = random.choice(followers)
        others = [i for i in range(3) if i != victim]
        before = {i: cluster.nodes[i].metrics()["changes"] for i in others}
        cluster.nodes[victim].signal(signal.SIGKILL)
        cluster.nodes[victim].proc.wait()
        time.sleep(0.3)
        cluster.nodes[victim].start()
        cluster.nodes[victim].wait_ready()
        time.sleep(2.0)  # steady load with the restarted follower back
        leader2, term2 = cluster.leader()
        after = {i: cluster.nodes[i].metrics()["changes"] for i in others}
        changes = sum(after[i] - before[i] for i in others)
        rounds.append({"round": r, "leader": leader, "term": term, "leader_after": leader2,
                       "term_after": term2, "counter_delta_survivors": changes,
                       "load": loadavg()})
        print(json.dumps(rounds[-1]), flush=True)
    leader_end, term_end = cluster.leader()
    changed = sum(1 for x in rounds if x["leader_after"] != x["leader"] or x["term_after"] != x["term"])
    summary = {"scenario": "prevote", "bin": args.bin, "rounds": args.rounds,
               "rounds_with_leader_or_term_change": changed,
               "leader_changes_counted_by_survivors": sum(x["counter_delta_survivors"] for x in rounds),
               "term_start": term0, "term_end": term_end, "leader_start": leader0,
               "leader_end": leader_end, "load_end": loadavg()}
    print("SUMMARY " + json.dumps(summary), flush=True)


def stall(args, cluster):
    cluster.start()
    cluster.leader()
    cluster.start_load(16, args.rounds * 12 + 30)
    time.sleep(3)
    elected, acked, hist = [], [], []
    for r in range(args.rounds):
        leader, term = cluster.leader()
        idx = cluster.index_of(leader)
        t0 = time.time()
        cluster.nodes[idx].signal(signal.SIGUSR2)
        t_new = None
        deadline = t0 + 6
        while time.time() < deadline and t_new is None:
            for i, n in enumerate(cluster.nodes):
                if i == idx:
                    continue
                m = n.metrics()
                if m and m["leader"] == n.ready["node"]:
                    t_new = time.time()
                    break
            time.sleep(0.01)
        time.sleep(4)  # the 3 s stall ends; load goes on
        # First message the new leader stamped (at_ms is set by the node taking the send).
        stamps = []
        for ch in range(8):
            stamps += cluster.history_at_ms(f"load-{ch}")
        rec = {"round": r, "load": loadavg(), "stalled_leader": leader,
               "new_leader_ms": None if t_new is None else round((t_new - t0) * 1e3, 1)}
        if t_new is not None:
            after = [s for s in stamps if s >= t_new * 1e3]
            rec["first_send_at_new_leader_ms"] = round(min(after) - t0 * 1e3, 1) if after else None
            elected.append(rec["new_leader_ms"])
            if after:
                acked.append(rec["first_send_at_new_leader_ms"])
        hist.append(rec)
        print(json.dumps(rec), flush=True)
    def s(xs):
        return {"n": len(xs), "p50": statistics.median(xs) if xs else None,
                "max": max(xs) if xs else None}
    print("SUMMARY " + json.dumps({"scenario": "stall", "rounds": args.rounds,
                                    "new_leader_ms": s(elected),
                                    "first_send_at_new_leader_ms": s(acked),
                                    "load_end": loadavg()}), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["prevote", "stall"])
    p.add_argument("--bin", required=True)
    p.add_argument("--label", default="run")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    extra = ["--weaken", "stall-fsync"] if args.scenario == "stall" else []
    args.rounds = args.rounds or (10 if args.scenario == "stall" else 20)
    cluster = Cluster(args.bin, args.label, extra)
    try:
        (prevote if args.scenario == "prevote" else stall)(args, cluster)
    finally:
        cluster.stop()
        if not args.keep:
            shutil.rmtree(cluster.root, ignore_errors=True)


if __name__ == "__main__":
    main()
