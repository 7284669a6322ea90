#!/usr/bin/env python3
"""Endurance (soak) run of the whole hub binary: one roomhub under three
`roomhub load` runs at once for --seconds (default 600), watching whether the
hub's memory, file descriptors, threads and data directory stay flat.

The hub runs on CPU 0 (`taskset -c 0`) with a fresh data dir, history capped
at 100 messages per room (every append prunes), permessage-deflate accepted,
the per-connection and per-IP limits lifted, and --durability (batched or
sync). The loads run on CPU 1 (`taskset -c 1`), each with `--threads 1`:

  steady  400 clients in 200 rooms, 1 publisher per room at 50/s, spread
          (~10k publishes/s, 200 rooms pruning on every append);
  churn   back-to-back short runs (200 clients, 50 rooms, 20/s, 3 s) on new
          rooms each time (`churn-0`, `churn-1`, ...; every other one with
          --compress): rooms are created, emptied and stopped, connections
          open and close, until the time is up;
  zload   200 clients in 20 rooms at 20/s, every client compressed.

Every --every seconds one CSV line goes to stdout (and to --csv FILE):
`secs,rss_mb,open_fds,threads,data_dir_mb,churn_runs`; each churn run's
figures go to stderr as one JSON line. At the end the loads
are stopped (each subprocess is bounded by a timeout and killed by its PID),
the hub gets SIGTERM and must exit 0, and one JSON summary is printed: each
load's totals (churn summed over its runs; p99 the worst), the RSS at warm-up
(the first sample at >= 60 s, else at >= 30 s; runs shorter than that use the
middle sample and say so), its max and last, fds, data dir, the hub's exit
code and a verdict: lost == 0, exit 0 and last RSS <= 1.5 x warm-up RSS (and
every load reported). The script exits 0 when the verdict passes, 1 if not.

Everything is on loopback; the hub and the loads run in a temporary work
directory (so no config/default.toml is picked up), removed at the end.

    cargo build --release
    benches/hub_soak.py --bin target/release/roomhub --seconds 600 --csv soak.csv
    benches/hub_soak.py --durability sync --seconds 120 --every 2
"""
import argparse, json, os, shutil, signal, socket, subprocess, sys, tempfile
import threading, time
from bench_env import LIFTED, free_port

STEADY = ["--clients", "400", "--rooms", "200", "--publishers", "1", "--rate", "50",
          "--spread"]
CHURN = ["--clients", "200", "--rooms", "50", "--publishers", "1", "--rate", "20"]
CHURN_SECS = 3
ZLOAD = ["--clients", "200", "--rooms", "20", "--publishers", "1", "--rate", "20",
         "--compress", "--room-prefix", "zload"]
# Beyond its --duration a load may take up to 120 s to connect (its default
# --connect-timeout), 5 s to drain and 30 s to collect its clients' reports.
LOAD_SLACK = 120 + 5 + 30 + 30
CSV_HEADER = "secs,rss_mb,open_fds,threads,data_dir_mb,churn_runs"



def wait_port(port, proc, limit=30):
    deadline = time.time() + limit
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the hub exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def proc_status(pid):
    """(VmRSS in KiB, Threads) of a live process, (0, 0) once it is gone."""
    rss = threads = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return rss, threads


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return 0


def dir_bytes(path):
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed while we walk (sled rewrites files)
                pass
    return total


def stop_process(proc, term_wait=10):
    """Stop a process this script started, by its PID: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(term_wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    return proc.returncode


def tail(path, chars=1500):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


class Load:
    """One `roomhub load` subprocess with its output in files."""

    def __init__(self, args, port, work, name, extra, duration):
        self.name, self.duration = name, duration
        self.out_path = os.path.join(work, f"{name}.out")
        self.err_path = os.path.join(work, f"{name}.err")
        cmd = ["taskset", "-c", "1", args.load, "load", "--url", f"ws://127.0.0.1:{port}",
               "--threads", "1", "--json", "--duration", str(duration), *extra]
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=work, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL)
        self.deadline = time.time() + duration + LOAD_SLACK

    def done(self):
        return self.proc.poll() is not None

    def finish(self, timeout=None):
        """Wait (bounded) for the run's end; its summary, or {"error": ...}."""
        limit = max(0.0, self.deadline - time.time()) if timeout is None else timeout
        try:
            self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
            return {"error": f"{self.name}: timed out, killed", "stderr": tail(self.err_path)}
        try:
            with open(self.out_path) as f:
                return json.loads(f.read().strip().splitlines()[-1])
        except (OSError, IndexError, json.JSONDecodeError):
            return {"error": f"{self.name}: exit {self.proc.returncode}, no summary",
                    "stderr": tail(self.err_path)}


class Churn(threading.Thread):
    """Short loads on new rooms, back to back, until `until`."""

    def __init__(self, args, port, work, until):
        super().__init__(daemon=True)
        self.args, self.port, self.work, self.until = args, port, work, until
        self.results, self.current, self.stopping = [], None, threading.Event()
        self.lock = threading.Lock()

    def runs(self):
        with self.lock:
            return len(self.results)

    def run(self):
        n = 0
        # Start a run only while its publishing still fits in the time.
        while not self.stopping.is_set() and time.time() + CHURN_SECS <= self.until:
            extra = [*CHURN, "--room-prefix", f"churn-{n}"]
            if n % 2 == 1:
                extra.append("--compress")
            load = Load(self.args, self.port, self.work, "churn", extra, CHURN_SECS)
            self.current = load
            result = load.finish()
            result["run"], result["compressed"] = n, n % 2 == 1
            brief = {k: result[k] for k in ("run", "compressed", "error", "connect_secs",
                                            "acked", "lost", "disconnected") if k in result}
            if result.get("latency", {}).get("count"):
                brief["p99_ms"] = round(result["latency"]["p99_us"] / 1000, 2)
            print(json.dumps({"churn": brief}), file=sys.stderr, flush=True)
            with self.lock:
                self.results.append(result)
            n += 1

    def stop(self, timeout):
        """Let the current run end (bounded), then kill it by its PID."""
        self.stopping.set()
        self.join(timeout)
        if self.is_alive() and self.current is not None:
            stop_process(self.current.proc)
            self.join(30)


def totals(results):
    """Sums over runs (p99 and the worst latency: the max) of load summaries."""
    ok = [r for r in results if "error" not in r]
    t = {key: sum(r.get(key, 0) for r in ok)
         for key in ["sent", "acked", "deliveries", "expected_deliveries", "lost",
                     "duplicates", "out_of_order", "stale", "disconnected", "errors",
                     "connected", "connect_failed"]}
    p99 = [r["latency"]["p99_us"] for r in ok if r.get("latency", {}).get("count")]
    t["p99_ms"] = round(max(p99) / 1000, 2) if p99 else None
    t["runs"], t["failed_runs"] = len(results), len(results) - len(ok)
    first_error = next((r.get("first_error") for r in ok if r.get("first_error")), None)
    if first_error:
        t["first_error"] = first_error
    failures = [{k: r[k] for k in ("run", "error", "stderr") if k in r}
                for r in results if "error" in r]
    if failures:
        t["failures"] = failures[:3]
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="target/release/roomhub")
    ap.add_argument("--load", default=None, help="the roomhub whose `load` drives (default --bin)")
    ap.add_argument("--seconds", type=int, default=600, help="how long the loads run")
    ap.add_argument("--every", type=float, default=5, help="seconds between samples")
    ap.add_argument("--durability", choices=["batched", "sync"], default="batched")
    ap.add_argument("--csv", default=None, help="also write the samples to this file")
    args = ap.parse_args()
    if args.seconds < CHURN_SECS or args.every <= 0:
        ap.error("--seconds must be at least 3 and --every positive")
    args.bin = os.path.abspath(args.bin)
    args.load = os.path.abspath(args.load or args.bin)

    work = tempfile.mkdtemp(prefix="roomhub-soak-")
    data = os.path.join(work, "data")
    port = free_port()
    env = dict(os.environ, **LIFTED)
    env.update({
        "ROOMHUB_SERVER__BIND": f"127.0.0.1:{port}",
        "ROOMHUB_STORAGE__DATA_DIR": data,
        "ROOMHUB_STORAGE__DURABILITY": args.durability,
        "ROOMHUB_HISTORY__MAX_PER_ROOM": "100",
        "ROOMHUB_WEBSOCKET__COMPRESSION": "true",
    })
    hub_log = os.path.join(work, "hub.log")
    csv_file = open(args.csv, "w") if args.csv else None
    hub, loads, churn, samples = None, [], None, []
    hub_exit, hub_died = None, False
    try:
        with open(hub_log, "w") as log:
            hub = subprocess.Popen(["taskset", "-c", "0", args.bin], cwd=work, env=env,
                                   stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        wait_port(port, hub)

        def emit(line):
            print(line, flush=True)
            if csv_file:
                csv_file.write(line + "\n")
                csv_file.flush()

        def sample(at):
            rss, threads = proc_status(hub.pid)
            row = {"secs": round(at, 1), "rss_mb": round(rss / 1024, 1),
                   "open_fds": open_fds(hub.pid), "threads": threads,
                   "data_dir_mb": round(dir_bytes(data) / 2**20, 1),
                   "churn_runs": churn.runs()}
            samples.append(row)
            emit(",".join(str(row[k]) for k in CSV_HEADER.split(",")))

        emit(CSV_HEADER)
        started = time.time()
        until = started + args.seconds
        loads.append(Load(args, port, work, "steady", STEADY, args.seconds))
        loads.append(Load(args, port, work, "zload", ZLOAD, args.seconds))
        churn = Churn(args, port, work, until)
        churn.start()

        # Sample until every load has ended (theirs drains run past --seconds),
        # bounded by the loads' own timeouts.
        hard_stop = until + LOAD_SLACK
        next_at = started + args.every
        while time.time() < hard_stop:
            if hub.poll() is not None:
                hub_died = True
                print(f"hub exited early with {hub.returncode}", file=sys.stderr)
                break
            if all(l.done() for l in loads) and not churn.is_alive():
                break
            now = time.time()
            if now >= next_at:
                sample(now - started)
                while next_at <= now:
                    next_at += args.every
                continue
            time.sleep(min(0.25, next_at - now))
        results = {l.name: l.finish(timeout=max(1.0, l.deadline - time.time())) for l in loads}
        churn.stop(timeout=max(1.0, hard_stop - time.time()))
        if not hub_died:
            sample(time.time() - started)  # the last one: loads over, hub still up
            hub_exit = stop_process(hub, term_wait=60)
        else:
            hub_exit = hub.returncode
    except BaseException as e:
        # Interrupted or failed: stop what this script started, by PID.
        for l in loads:
            stop_process(l.proc)
        if churn is not None:
            churn.stopping.set()
            for _ in range(2):  # the run in progress, and one started meanwhile
                if churn.current is not None:
                    stop_process(churn.current.proc)
                churn.join(30)
        if hub is not None:
            stop_process(hub, term_wait=60)
        if isinstance(e, RuntimeError):
            raise SystemExit(f"{e}\n{tail(hub_log)}")
        raise
    finally:
        if csv_file:
            csv_file.close()
        log_tail = tail(hub_log, 3000)
        shutil.rmtree(work, ignore_errors=True)

    # Warm-up: the first sample at >= 60 s, else at >= 30 s; else (a short run)
    # the middle sample.
    warm = next((s for s in samples if s["secs"] >= 60), None) \
        or next((s for s in samples if s["secs"] >= 30), None)
    warm_fallback = warm is None and bool(samples)
    if warm_fallback:
        warm = samples[len(samples) // 2]
    rss = [s["rss_mb"] for s in samples]
    fds = [s["open_fds"] for s in samples]
    threads = [s["threads"] for s in samples]
    dirs = [s["data_dir_mb"] for s in samples]

    load_totals = {"steady": totals([results["steady"]]), "churn": totals(churn.results),
                   "zload": totals([results["zload"]])}
    lost = sum(t["lost"] for t in load_totals.values())
    failed = sum(t["failed_runs"] for t in load_totals.values())
    rss_ok = bool(samples) and warm["rss_mb"] > 0 and rss[-1] <= 1.5 * warm["rss_mb"]
    passed = lost == 0 and hub_exit == 0 and rss_ok and failed == 0
    verdict = (f"{'PASS' if passed else 'FAIL'}: lost {lost} (want 0), hub exit {hub_exit} "
               f"(want 0), last RSS {rss[-1] if rss else None} MB "
               f"{'<=' if rss_ok else 'NOT <='} 1.5 x warm-up "
               f"{warm['rss_mb'] if warm else None} MB, failed load runs {failed} (want 0)")
    summary = {
        "seconds": args.seconds,
        "durability": args.durability,
        "bin": args.bin,
        "loads": load_totals,
        "churn_runs": len(churn.results),
        "rss_mb": {"warmup": warm["rss_mb"] if warm else None,
                   "warmup_at_secs": warm["secs"] if warm else None,
                   "warmup_fallback_middle_sample": warm_fallback,
                   "max": max(rss, default=None), "last": rss[-1] if rss else None},
        "open_fds": {"min": min(fds, default=None), "max": max(fds, default=None),
                     "last": fds[-1] if fds else None},
        "threads": {"min": min(threads, default=None), "max": max(threads, default=None),
                    "last": threads[-1] if threads else None},
        "data_dir_mb": {"max": max(dirs, default=None), "last": dirs[-1] if dirs else None},
        "hub_exit_code": hub_exit,
        "pass": passed,
        "verdict": verdict,
    }
    if hub_exit != 0 or hub_died:
        summary["hub_log_tail"] = log_tail
    print(json.dumps(summary, indent=1))
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
