#!/usr/bin/env python3
"""Scenarios A, B, C, D and the durable run (BENCHMARKS.md, "Scenarios and
commands") against roomhub and the hand-written reference relay, one after the
other in the same session, with the same `roomhub load` command; roomhub also
with every client offering permessage-deflate (`load --compress`). Prints one
JSON object with every run and the ratios roomhub / relay.

The server runs on CPU 0 (`taskset -c 0`), the load tool on CPU 1. Each run
starts a fresh server (a new data dir for roomhub) and stops it by its PID.
Everything is on loopback and bounded in time.

    cargo build --release
    cargo build --release --manifest-path ../shared/reference/rust-hub/Cargo.toml \
        --target-dir target/reference
    benches/relay_compare.py --bin target/release/roomhub \
        --relay target/reference/release/rust-hub --rounds 2
"""
import argparse, json, os, shutil, signal, socket, statistics, subprocess, sys
import tempfile, threading, time
from bench_env import LIFTED, free_port

SCENARIOS = {
    "A": ["--clients", "1000", "--rooms", "1", "--publishers", "1", "--window", "64"],
    "B": ["--clients", "2000", "--rooms", "100", "--publishers", "1", "--rate", "100"],
    "C": ["--clients", "1000", "--rooms", "1", "--publishers", "1", "--rate", "100"],
    "D": ["--clients", "19000", "--rooms", "100", "--publishers", "0"],
    "durable": ["--clients", "10", "--rooms", "1", "--publishers", "10", "--window", "64"],
}



def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def wait_port(port, limit=30):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def start_server(kind, args, durability, compression, work):
    port = free_port()
    if kind == "relay":
        cmd = ["taskset", "-c", "0", args.relay, "--mode", "hub", "--port", str(port),
               "--queue", "65536"]
        env = dict(os.environ)
    else:
        data = tempfile.mkdtemp(dir=work)
        cmd = ["taskset", "-c", "0", args.bin]
        env = dict(os.environ, **LIFTED)
        env.update({
            "ROOMHUB_SERVER__BIND": f"127.0.0.1:{port}",
            "ROOMHUB_STORAGE__DATA_DIR": data,
            "ROOMHUB_STORAGE__DURABILITY": durability,
            "ROOMHUB_WEBSOCKET__COMPRESSION": "true" if compression else "false",
        })
        env.update(kv.split("=", 1) for kv in args.env)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(kind, scenario, args, work, durability="batched", compress=False):
    proc, port = start_server(kind, args, durability, compress, work)
    time.sleep(0.3)
    base_kib = rss_kib(proc.pid)
    samples, done = [], threading.Event()

    def sample():
        while not done.is_set():
            samples.append((time.time(), rss_kib(proc.pid)))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    cmd = ["taskset", "-c", "1", args.load, "load", "--url", f"ws://127.0.0.1:{port}",
           "--threads", "1", "--json", "--duration", str(args.duration),
           *SCENARIOS[scenario]]
    if compress:
        cmd.append("--compress")
    started = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 240)
    done.set()
    sampler.join()
    stop(proc)
    try:
        result = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": out.stderr[-1500:]}
    figures = {
        "acked_per_sec": result.get("acked_per_sec"),
        "deliveries_per_sec": result.get("deliveries_per_sec"),
        "p50_ms": result["latency"]["p50_us"] / 1000 if result.get("latency") else None,
        "p99_ms": result["latency"]["p99_us"] / 1000 if result.get("latency") else None,
        "lost": result.get("lost"),
        "disconnected": result.get("disconnected"),
        "connected": result.get("connected"),
    }
    if scenario == "D":
        # Idle RSS: the samples of the last 3 s of the run (all connected).
        end = started + args.duration + result.get("connect_secs", 0)
        idle = [kib for at, kib in samples if end - 3 <= at <= end] or [samples[-1][1]]
        idle_kib = statistics.median(idle)
        figures.update({
            "rss_before_kib": base_kib,
            "rss_idle_kib": idle_kib,
            "rss_peak_kib": max(kib for _, kib in samples),
            "kib_per_connection": round((idle_kib - base_kib) / max(1, result["connected"]), 2),
        })
    return figures


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/roomhub")
    ap.add_argument("--load", default=None, help="the roomhub whose `load` drives (default --bin)")
    ap.add_argument("--relay", default="target/reference/release/rust-hub")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--only", default="A,B,C,D,durable")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra setting for the roomhub runs (repeatable)")
    ap.add_argument("--no-relay", action="store_true", help="skip the relay's runs")
    ap.add_argument("--no-compressed", action="store_true",
                    help="skip the runs with every client compressed")
    args = ap.parse_args()
    args.bin, args.relay = os.path.abspath(args.bin), os.path.abspath(args.relay)
    args.load = os.path.abspath(args.load or args.bin)
    only = args.only.split(",")
    work = tempfile.mkdtemp(prefix="roomhub-relay-")
    plan = []
    for s in ["A", "B", "C", "D"]:
        if s in only:
            if not args.no_relay:
                plan.append((f"{s} relay", "relay", s, "batched", False))
            plan.append((f"{s} batched", "roomhub", s, "batched", False))
            if s != "D":
                plan.append((f"{s} sync", "roomhub", s, "sync", False))
            if not args.no_compressed:
                plan.append((f"{s} batched compressed", "roomhub", s, "batched", True))
    if "durable" in only:
        plan.append(("durable sync", "roomhub", "durable", "sync", False))
    results = {}
    try:
        for round_ in range(args.rounds):
            for name, kind, scenario, durability, compress in plan:
                figures = run(kind, scenario, args, work, durability, compress)
                results.setdefault(name, []).append(figures)
                print(json.dumps({"round": round_, "run": name, **figures}), file=sys.stderr,
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def best(name, key, pick=max):
        values = [r.get(key) for r in results.get(name, []) if r.get(key) is not None]
        return pick(values) if values else None

    ratios = {}
    for s in ["A", "B", "C", "D"]:
        relay = f"{s} relay"
        if relay not in results:
            continue
        for variant in ["batched", "sync", "batched compressed"]:
            name = f"{s} {variant}"
            if name not in results:
                continue
            if s == "A":
                r = best(relay, "deliveries_per_sec")
                ratios[name] = round(best(name, "deliveries_per_sec") / r, 2) if r else None
            elif s in ("B", "C"):
                r = best(relay, "p99_ms", min)
                ratios[name] = round(best(name, "p99_ms", min) / r, 2) if r else None
            else:
                r = best(relay, "kib_per_connection", min)
                ratios[name] = round(best(name, "kib_per_connection", min) / r, 2) if r else None
    print(json.dumps({"runs": results, "ratios_best_of_rounds": ratios}))


if __name__ == "__main__":
    main()
