#!/usr/bin/env python3
"""Cluster at scale: what a room costs NATS, and how the cluster behaves with
many rooms (BENCHMARKS.md, "Cluster at scale").

Starts a nats-server (JetStream, monitoring port) and three roomhub nodes on
loopback, then:
  1. creates rooms by one HTTP publish each (round robin over the nodes) up to
     each checkpoint of --rooms, timing every publish; at each checkpoint it
     records nats-server RSS, JetStream streams/consumers, NATS subscriptions
     and the nodes' RSS;
  2. publishes into one hot room from all three nodes at once (`roomhub load`);
  3. restarts nats-server (same store) and times until every node is ready and
     a publish into an existing room is acked;
  4. measures cross-node publish->deliver latency (`roomhub load`, 100 rooms x
     20 members, publishers on node 1, members on nodes 2 and 3) at each
     --latency-rates (messages/s per room).
Everything runs on loopback, bounded in count and time; only processes this
script started are stopped. Prints one JSON object.

    benches/cluster_scale.py --bin target/release/roomhub --rooms 1000,10000,100000
"""
import argparse, concurrent.futures, json, os, shutil, signal, socket, subprocess
import sys, tempfile, time, urllib.request, urllib.error

API_KEY = "scale-bench-key"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def get_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def status(url, timeout=2):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:
        return None


def publish(base, room, data, timeout=30):
    req = urllib.request.Request(
        f"{base}/api/rooms/{room}/messages",
        data=json.dumps({"data": data}).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        method="POST",
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            code = r.status
    except urllib.error.HTTPError as e:
        code = e.code
    except Exception:
        code = None
    return code, (time.perf_counter() - start) * 1000


def wait_until(check, limit, what):
    deadline = time.time() + limit
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out: {what}")


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(len(values) * p))], 1)


class Nats:
    def __init__(self, work):
        self.port, self.mport = free_port(), free_port()
        self.store = os.path.join(work, "nats")
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            ["nats-server", "-js", "-a", "127.0.0.1", "-p", str(self.port),
             "-m", str(self.mport), "-sd", self.store],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: status(f"http://127.0.0.1:{self.mport}/healthz") == 200, 300,
                   "nats-server healthy")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def figures(self):
        m = f"http://127.0.0.1:{self.mport}"
        jsz = get_json(f"{m}/jsz", timeout=30)
        subsz = get_json(f"{m}/subsz", timeout=30)
        return {
            "nats_rss_mb": round(rss_mb(self.proc.pid), 1),
            "streams": jsz.get("streams"),
            "consumers": jsz.get("consumers"),
            "js_messages": jsz.get("messages"),
            "js_store_mb": round(jsz.get("bytes", 0) / 1e6, 1),
            "subscriptions": subsz.get("num_subscriptions"),
        }


def start_node(binary, work, nats_url, i, extra):
    port = free_port()
    data = os.path.join(work, f"node{i}")
    env = dict(os.environ)
    env.update({
        "ROOMHUB_SERVER__BIND": f"127.0.0.1:{port}",
        "ROOMHUB_SERVER__NODE_ID": f"node{i}",
        "ROOMHUB_STORAGE__DATA_DIR": data,
        "ROOMHUB_CLUSTER__NATS_URL": nats_url,
        "ROOMHUB_AUTH__API_KEY": API_KEY,
        "ROOMHUB_LIMITS__PUBLISH_PER_SEC": "100000",
        "ROOMHUB_LIMITS__PUBLISH_BURST": "100000",
        "ROOMHUB_LIMITS__HANDSHAKES_PER_IP_PER_SEC": "100000",
        "ROOMHUB_LIMITS__MAX_CONNECTIONS_PER_IP": "100000",
        "RUST_LOG": "warn",
    })
    env.update(extra)
    log = open(os.path.join(work, f"node{i}.log"), "w")
    proc = subprocess.Popen([binary], env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def run_load(binary, args):
    out = subprocess.run([binary, "load", "--json", *args], capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/roomhub")
    ap.add_argument("--load-bin", default=None,
                    help="the roomhub whose `load` drives the runs (default: --bin); "
                         "lets an older hub build be measured with today's load tool")
    ap.add_argument("--rooms", default="1000,10000,100000")
    ap.add_argument("--threads", type=int, default=48)
    ap.add_argument("--partitions", default=None)
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--latency-rates", default="20,100",
                    help="msg/s per room of the cross-node latency runs (100 rooms x 20 members)")
    args = ap.parse_args()
    binary = os.path.abspath(args.bin)
    load_bin = os.path.abspath(args.load_bin or args.bin)
    checkpoints = [int(x) for x in args.rooms.split(",")]
    work = tempfile.mkdtemp(prefix="roomhub-scale-")
    extra = {}
    if args.partitions:
        extra["ROOMHUB_CLUSTER__PARTITIONS"] = args.partitions
    nats = Nats(work)
    nats_url = f"nats://127.0.0.1:{nats.port}"
    nodes = [start_node(binary, work, nats_url, i, extra) for i in range(3)]
    result = {"checkpoints": [], "binary": binary}
    try:
        for _, base in nodes:
            wait_until(lambda: status(f"{base}/readyz") == 200, 120, f"{base} ready")
        created, failures = 0, 0
        pool = concurrent.futures.ThreadPoolExecutor(args.threads)
        for target in checkpoints:
            latencies = []
            start = time.perf_counter()
            jobs = [pool.submit(publish, nodes[i % 3][1], f"scale-{i}", i)
                    for i in range(created, target)]
            for job in jobs:
                code, ms = job.result()
                if code == 201:
                    latencies.append(ms)
                else:
                    failures += 1
            elapsed = time.perf_counter() - start
            made = target - created
            created = target
            point = {
                "rooms": target,
                "rooms_created_per_s": round(made / elapsed, 1),
                "new_room_publish_ms_p50": percentile(latencies, 0.5),
                "new_room_publish_ms_p99": percentile(latencies, 0.99),
                "new_room_publish_ms_max": percentile(latencies, 1.0),
                "failures_so_far": failures,
                "node_rss_mb": [round(rss_mb(p.pid), 1) for p, _ in nodes],
            }
            point.update(nats.figures())
            result["checkpoints"].append(point)
            print(json.dumps(point), file=sys.stderr, flush=True)
        # Idle: the rooms' actors stop after rooms.idle_timeout_ms (30 s).
        time.sleep(35)
        idle = nats.figures()
        idle["node_rss_mb"] = [round(rss_mb(p.pid), 1) for p, _ in nodes]
        result["after_rooms_went_idle"] = idle
        print(json.dumps(idle), file=sys.stderr, flush=True)
        urls = ",".join(b.replace("http", "ws") for _, b in nodes)
        if not args.skip_load:
            result["hot_room_three_nodes"] = run_load(load_bin, [
                "--url", urls, "--rooms", "1", "--clients", "3", "--publishers", "3",
                "--window", "64", "--duration", "10", "--room-prefix", "hot"])
        # NATS restarted with its store: how long until every node serves again.
        nats.stop()
        restarted = time.perf_counter()
        nats.start()
        started = time.perf_counter() - restarted
        for _, base in nodes:
            wait_until(lambda: status(f"{base}/readyz") == 200, 600, "ready after restart")
        ready = time.perf_counter() - restarted
        wait_until(lambda: publish(nodes[1][1], "scale-5", "after restart")[0] == 201, 600,
                   "publish after restart")
        result["nats_restart"] = {
            "nats_start_s": round(started, 2),
            "nodes_ready_s": round(ready, 2),
            "publish_acked_s": round(time.perf_counter() - restarted, 2),
        }
        after = nats.figures()
        after["node_rss_mb"] = [round(rss_mb(p.pid), 1) for p, _ in nodes]
        result["after_restart"] = after
        print(json.dumps(result["nats_restart"]), file=sys.stderr, flush=True)
        if not args.skip_load:
            ws = [b.replace("http", "ws") for _, b in nodes]
            result["cross_node_latency"] = {}
            for rate in args.latency_rates.split(","):
                result["cross_node_latency"][f"{rate}_per_room"] = run_load(load_bin, [
                    "--url", f"{ws[1]},{ws[2]}", "--publish-url", ws[0], "--rooms", "100",
                    "--clients", "2000", "--publishers", "1", "--rate", rate, "--spread",
                    "--duration", "20", "--room-prefix", f"latency{rate}-"])
        print(json.dumps(result))
    finally:
        for proc, _ in nodes:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in nodes:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        nats.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
