#!/usr/bin/env python3
"""What backend hooks cost (BENCHMARKS.md, "Backend hooks").

Runs the same two `roomhub load` commands against one hub without hooks and
against one whose connect and publish hooks point at a local backend (this
script, Python's ThreadingHTTPServer with keep-alive, checking every
signature as the README's example does):

  connect: 2 000 clients join 100 rooms (connections per second);
  publish: 100 rooms x 20 members, one publisher per room at --rate msg/s
           (publish -> delivery latency p50/p99, every publish approved by
           the publish hook when hooks are on).

Loopback only, every run bounded; stops only what it started. Prints one
JSON object.

    benches/hooks_cost.py --bin target/release/roomhub
"""
import argparse, hashlib, hmac, json, os, shutil, signal, socket, subprocess
import sys, tempfile, threading, time, urllib.error, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = b"hooks-bench-secret"
CALLS = {"connect": 0, "publish": 0, "refused": 0}


class Backend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        mac = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(mac, self.headers.get("X-Roomhub-Signature", "")):
            CALLS["refused"] += 1
            return self.answer(401, {})
        event = json.loads(body)
        if self.path == "/connect":
            CALLS["connect"] += 1
            return self.answer(200, {"user": event["query"].get("user", "anon")})
        CALLS["publish"] += 1
        self.answer(200, {})

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_):
        pass


class BackendServer(ThreadingHTTPServer):
    # The default listen backlog (5) drops the hub's new keep-alive
    # connections under a burst of upgrades (SYN retries of 1 s and more).
    request_queue_size = 1024
    daemon_threads = True


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(base):
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def run_hub(binary, work, hooks_base, loads):
    port = free_port()
    env = dict(os.environ)
    env.update({
        "ROOMHUB_SERVER__BIND": f"127.0.0.1:{port}",
        "ROOMHUB_STORAGE__DATA_DIR": os.path.join(work, f"data-{port}"),
        "ROOMHUB_LIMITS__PUBLISH_PER_SEC": "100000",
        "ROOMHUB_LIMITS__PUBLISH_BURST": "100000",
        "ROOMHUB_LIMITS__HANDSHAKES_PER_IP_PER_SEC": "100000",
        "ROOMHUB_LIMITS__MAX_CONNECTIONS_PER_IP": "100000",
        "RUST_LOG": "warn",
    })
    if hooks_base:
        env.update({
            "ROOMHUB_HOOKS__SECRET": SECRET.decode(),
            "ROOMHUB_HOOKS__CONNECT_URL": f"{hooks_base}/connect",
            "ROOMHUB_HOOKS__PUBLISH_URL": f"{hooks_base}/publish",
        })
    hub = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while not ready(base):
            if time.time() > deadline or hub.poll() is not None:
                raise SystemExit("hub did not become ready")
            time.sleep(0.05)
        results = {}
        for name, args in loads.items():
            out = subprocess.run(
                [binary, "load", "--json", "--url", base.replace("http", "ws"), *args],
                capture_output=True, text=True, timeout=300)
            if out.returncode != 0:
                results[name] = {"error": out.stderr[-1000:]}
                continue
            s = json.loads(out.stdout.strip().splitlines()[-1])
            results[name] = {
                "connected": s["connected"],
                "connect_failed": s.get("connect_failed"),
                "connects_per_s": round(s["connected"] / s["connect_secs"], 1),
                "acked": s["acked"],
                "errors": s["errors"],
                "lost": s["lost"],
                "latency_ms": s["latency"],
            }
            print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
        return results
    finally:
        hub.send_signal(signal.SIGTERM)
        try:
            hub.wait(30)
        except subprocess.TimeoutExpired:
            hub.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/roomhub")
    ap.add_argument("--rate", default="5")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    binary = os.path.abspath(args.bin)
    backend = BackendServer(("127.0.0.1", free_port()), Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    hooks_base = f"http://127.0.0.1:{backend.server_address[1]}"
    loads = {
        # 128 upgrades at once: under the hub's 256 connect-hook calls in
        # flight, beyond which upgrades are refused (503) by design.
        "connect": ["--clients", "2000", "--rooms", "100", "--publishers", "0",
                    "--duration", "1", "--drain", "1", "--room-prefix", "c",
                    "--connect-concurrency", "128"],
        "publish": ["--clients", "2000", "--rooms", "100", "--publishers", "1",
                    "--rate", args.rate, "--spread", "--duration", "20",
                    "--room-prefix", "p", "--connect-concurrency", "128"],
    }
    work = tempfile.mkdtemp(prefix="roomhub-hooks-")
    result = {"without_hooks": [], "with_hooks": []}
    try:
        # Alternate the two set-ups so drift on a shared machine hits both.
        for _ in range(args.rounds):
            result["without_hooks"].append(run_hub(binary, work, None, loads))
            result["with_hooks"].append(run_hub(binary, work, hooks_base, loads))
        result["backend_calls"] = dict(CALLS)
        print(json.dumps(result))
    finally:
        backend.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
