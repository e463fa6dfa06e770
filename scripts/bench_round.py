#!/usr/bin/env python3
"""A whole federated round, deployed, like for like: fedtalent vs Flower on this machine.

  bench_round.py fedtalent --bin target/release --rounds 4 --work DIR
      `coordinator simulate` (the coordinator over QUIC + mutual TLS and one `site-agent run`
      process per site, 3 sites) with the `unet` preset and one shared decoder (a ~117 MB float32
      model), `[plan].local_steps = 0`: no local training, each site downloads the global model
      and uploads it unchanged; the coordinator validates, aggregates and checkpoints as always.
      One phantom case per site: a site keeps at least one training case, so none is left for
      validation and the sites never evaluate the global model (they would in the first and the
      last round). Round time: the coordinator's own `wall_ms` (round opened -> checkpoint
      committed) from state/metrics.jsonl.
  bench_round.py flower --floats N --rounds 4 --work DIR
      A Flower deployment (flower-superlink + 3 flower-supernode, `flwr run` of
      scripts/flower_echo): FedAvg over one float32 array of N values (the same byte count), each
      ClientApp echoes it. Round time: from the strategy's configure_train to the end of the
      round's (empty) evaluation stage, measured inside the ServerApp.

Both print one JSON line: the per-round wall times, their median, and the peak over the run of
the summed resident set size (VmRSS) of every process of the deployment (sampled every 50 ms;
shared libraries count once per process, as `ps` would add them up).
"""
import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def tree(pid):
    """pid and all its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakRss:
    """Samples the summed RSS of the process trees under `roots()` until stopped."""

    def __init__(self, roots):
        self.roots, self.peak_kib, self.peak_procs, self._stop = roots, 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            pids = {p for r in self.roots() for p in tree(r)}
            total = sum(rss_kib(p) for p in pids)
            if total > self.peak_kib:
                self.peak_kib, self.peak_procs = total, len(pids)
            time.sleep(0.05)

    def stop(self):
        self._stop.set()
        self._thread.join()
        return round(self.peak_kib / 1024, 1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def fedtalent(args):
    out = os.path.join(args.work, "fedtalent")
    cmd = [os.path.join(args.bin, "coordinator"), "simulate", "--out", out, "--preset", "unet",
           "--per-site-decoders", "false", "--local-steps", "0", "--rounds", str(args.rounds),
           "--cases", "1", "--shape", "48", "128", "128",
           "--postprocess", "false", "--device", "cpu"]
    with open(os.path.join(args.work, "fedtalent.log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        mem = PeakRss(lambda: [proc.pid])
        rc = proc.wait()
        peak = mem.stop()
    if rc != 0:
        sys.exit(f"coordinator simulate failed ({rc}); see {args.work}/fedtalent.log")
    rounds, sites = [], []
    with open(os.path.join(out, "coordinator", "state", "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if m.get("kind") == "round":
                rounds.append(m["wall_ms"] / 1000)
            elif "n_cases" in m:
                sites.append(m)
    down = [s.get("bytes_down") for s in sites if s.get("bytes_down")]
    up = [s["bytes_up"] for s in sites]
    report("fedtalent", rounds, peak, mem.peak_procs, {
        "model_bytes_down_per_site": max(down) if down else None,
        "model_bytes_up_per_site": max(up) if up else None,
        "note": "coordinator simulate, unet preset, shared decoder, local_steps 0 (no training), one "
                "case per site (so no validation case: the sites never evaluate)",
    })


def flower(args):
    work = os.path.join(args.work, "flower")
    home = os.path.join(work, "flwr-home")
    os.makedirs(home, exist_ok=True)
    bindir = os.path.dirname(sys.executable)
    # The SuperLink and SuperNodes start Flower's other executables from PATH.
    env = dict(os.environ, FLWR_HOME=home, OMP_NUM_THREADS="1", PATH=bindir + os.pathsep + os.environ["PATH"])
    link = free_port()
    with open(os.path.join(home, "config.toml"), "w") as f:
        f.write(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    logs, procs = [], []

    def start(name, cmd):
        log = open(os.path.join(work, name + ".log"), "w")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=work, start_new_session=True))

    timing = os.path.join(work, "timing.json")
    try:
        start("superlink", [os.path.join(bindir, "flower-superlink"), "--insecure", "--port", str(link),
                            "--disable-runtime-dependency-installation"])
        mem = PeakRss(lambda: [p.pid for p in procs])
        wait_port(link)
        for i in range(3):
            start(f"supernode{i}", [os.path.join(bindir, "flower-supernode"), "--insecure", "--superlink",
                                    f"127.0.0.1:{link}", "--port", str(free_port()),
                                    "--node-config", f"partition-id={i}"])
        config = f"num-server-rounds={args.rounds} floats={args.floats} min-nodes=3 timing-file='{timing}'"
        start("flwr-run", [os.path.join(bindir, "flwr"), "run", os.path.join(HERE, "flower_echo"), "bench",
                           "--stream", "--run-config", config])
        end = time.time() + args.timeout
        while not os.path.exists(timing) and time.time() < end:
            time.sleep(0.2)
        time.sleep(0.5)
        peak = mem.stop()
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for log in logs:
            log.close()
    if not os.path.exists(timing):
        sys.exit(f"the Flower run did not finish in {args.timeout} s; see {work}/*.log")
    t = json.load(open(timing))
    import flwr

    report("flower", t["round_seconds"], peak, mem.peak_procs, {
        "flwr": flwr.__version__, "floats": args.floats, "model_bytes": 4 * args.floats,
        "echo_close": t["echo_close"],
        "note": "flower-superlink + 3 flower-supernode (ServerApp and ClientApps in their default "
                "subprocess isolation), FedAvg, clients echo the array",
    })


def report(impl, rounds, peak_mib, procs, extra):
    print(json.dumps({"bench": "round", "impl": impl, "sites": 3, "rounds": len(rounds),
                      "round_seconds": [round(r, 3) for r in rounds],
                      "median_round_s": round(statistics.median(rounds), 3) if rounds else None,
                      "peak_rss_mib": peak_mib, "processes_at_peak": procs, **extra}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("impl", choices=["fedtalent", "flower"])
    ap.add_argument("--work", required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--bin", default="target/release")
    ap.add_argument("--floats", type=int, default=30_000_000)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    {"fedtalent": fedtalent, "flower": flower}[args.impl](args)


if __name__ == "__main__":
    main()
