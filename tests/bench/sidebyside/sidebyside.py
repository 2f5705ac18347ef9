#!/usr/bin/python3
"""Side-by-side benchmark: integration-worker submitter against a Celery worker.

Run through run.sh (which checks the packages and the build).  For each provider
latency, each side gets a fresh mock-provider and a queue pre-filled with the
same N jobs; then its worker is started and the script waits for N
submission.accepted events on <ns>.events.  Figures per side, all from /proc:

  jobs/s          (N - 1) / (time of the last accepted event - time of the first)
  worker CPU      utime + stime of the worker process between the first and the
                  last accepted event, per 1,000 jobs
  stack CPU       the same for worker + RabbitMQ (beam.smp) + redis-server + mock
  peak RSS        the worker's VmHWM at the end

Pre-filling the queue keeps the publisher out of the window and gives both
workers the same full queue.  The ceilings, measured in the same run:

  mock alone      wrk POSTing to /api/v1/external-resource (a new Idempotency-Key
                  per request) with the workers' concurrency, latency 0
  broker alone    bench_broker: the job's message mix (persistent publish to a
                  quorum queue, consume, persistent publish of the event with
                  confirms, ack after the confirm, event read by a tap) without a
                  provider

The RabbitMQ and Redis are the shared ones; this script uses a namespace of its
own (t-sbs-<pid>) and deletes its queues, exchanges and keys at the end.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import amqp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
PY = "/usr/bin/python3"  # Debian's python3, where python3-celery is
TICK = os.sysconf("SC_CLK_TCK")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- /proc

def cpu_s(pid):
    """utime + stime of a process (all its threads) in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def listener_pid(port):
    """The pid of the process listening on 127.0.0.1:port (read-only look-up)."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True,
                         text=True).stdout
    m = re.search(r"pid=(\d+)", out)
    if not m:
        sys.exit(f"sidebyside: nothing listens on port {port}: run scripts/stack.sh up")
    return int(m.group(1))


# ---------------------------------------------------------------- processes

def start_mock(build, latency_ms, threads):
    p = subprocess.Popen([os.path.join(build, "bin", "mock-provider"), "--listen", "127.0.0.1:0",
                          "--latency-ms", str(latency_ms), "--rate-limits", "off", "--threads",
                          str(threads)], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    m = re.search(r":(\d+)\s*$", line)
    if not m:
        sys.exit(f"sidebyside: mock-provider did not start: {line!r}")
    return p, int(m.group(1))


def mock_stats(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/__admin/stats", timeout=10) as r:
        return json.load(r)


def stop(p, timeout=30):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def c_env(ns, port, args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IW_")}
    env.update({
        "IW_NAMESPACE": ns,
        "IW_PROVIDER_URL": f"http://127.0.0.1:{port}",
        "IW_API_KEY": "test-key-xxxxx",
        "IW_API_SECRET": "test-secret-xxxxx",
        "IW_HTTP_ADDR": "off",
        "IW_CONCURRENCY": str(args.concurrency),
        "IW_RATE_LIMITS": "1000000/s",
        "IW_POLL_SCHEDULE": "1h",
        "IW_LOG_LEVEL": args.log_level,
        "IW_SHUTDOWN_GRACE": "10s",
        "IW_SCHEMA_DIR": os.path.join(ROOT, "schemas"),
    })
    return env


def celery_env(ns, port, args):
    env = dict(os.environ)
    env.update({
        "SBS_NAMESPACE": ns,
        "SBS_PROVIDER_PORT": str(port),
        "SBS_CONCURRENCY": str(args.concurrency),
        "SBS_CELERY_WAKE": args.celery_wake,
        "SBS_SCHEMA": os.path.join(ROOT, "schemas", "submission-job.schema.json"),
        "PYTHONPATH": HERE,
    })
    return env


# ---------------------------------------------------------------- broker side

def amqp_open():
    c = amqp.Connection(host="127.0.0.1:5672", userid="guest", password="guest", virtual_host="/")
    c.connect()
    return c


def job_json(run, i):
    return json.dumps({"jobId": f"sbs-{run}-{i}", "userId": f"u-{i % 97}",
                       "action": "transaction",
                       "payload": {"amount": i, "currency": "EUR"}}, separators=(",", ":"))


def wait_depth(ch, queue, n, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        _, count, _ = ch.queue_declare(queue, passive=True)
        if count >= n:
            return
        time.sleep(0.2)
    sys.exit(f"sidebyside: {queue} holds {count} of {n} jobs after {timeout} s")


def prefill_c(ns, run, n):
    """N raw JSON jobs to <ns>.requests with submit.transaction, as upstreams publish."""
    conn = amqp_open()
    ch = conn.channel()
    for i in range(n):
        ch.basic_publish(amqp.Message(job_json(run, i), content_type="application/json",
                                      delivery_mode=2),
                         exchange=ns + ".requests", routing_key="submit.transaction")
    wait_depth(ch, ns + ".submit", n)
    conn.close()


def prefill_celery(ns, run, n, env):
    """N Celery protocol-2 messages (app.send_task), the job as the only argument."""
    code = (
        "import sys, json, sbs_celery as s\n"
        "n, run = int(sys.argv[1]), sys.argv[2]\n"
        "with s.app.producer_or_acquire() as p:\n"
        "    for i in range(n):\n"
        "        job = {'jobId': f'sbs-{run}-{i}', 'userId': f'u-{i % 97}', 'action': 'transaction',\n"
        "               'payload': {'amount': i, 'currency': 'EUR'}}\n"
        "        s.app.send_task('sbs.submit', args=[job], queue=s.app.amqp.queues[s.QUEUE],\n"
        "                        producer=p)\n")
    subprocess.run([PY, "-c", code, str(n), str(run)], env=env, check=True, cwd=HERE)
    conn = amqp_open()
    wait_depth(conn.channel(), ns + ".celery", n)
    conn.close()


class Tap:
    """A private queue bound to <ns>.events with submission.*; counts distinct jobs."""

    def __init__(self, ns):
        self.conn = amqp_open()
        self.ch = self.conn.channel()
        self.queue, _, _ = self.ch.queue_declare("", exclusive=True, auto_delete=True)
        self.ch.queue_bind(self.queue, ns + ".events", "submission.*")
        self.seen, self.failed, self.dups = set(), 0, 0
        self.first = self.last = None
        self.on_first = self.on_last = None
        self.target = 0
        self.ch.basic_consume(self.queue, callback=self._on_msg, no_ack=True)

    def _on_msg(self, m):
        if m.delivery_info["routing_key"] != "submission.accepted":
            self.failed += 1
            return
        cid = m.properties.get("correlation_id")
        if cid in self.seen:
            self.dups += 1
            return
        self.seen.add(cid)
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.on_first()
        self.last = now
        if len(self.seen) == self.target:
            self.on_last()

    def wait(self, n, on_first, on_last, timeout, alive):
        self.target, self.on_first, self.on_last = n, on_first, on_last
        deadline = time.monotonic() + timeout
        while len(self.seen) + self.failed < n and time.monotonic() < deadline and alive():
            try:
                self.conn.drain_events(timeout=1)
            except TimeoutError:
                pass
            except OSError as e:  # socket.timeout on older py-amqp
                if "timed out" not in str(e):
                    raise

    def close(self):
        self.conn.close()


def delete_namespace(ns):
    """Deletes every queue and exchange named <ns>.* and the Redis keys <ns>:*."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "--no-table-headers"],
                         capture_output=True, text=True).stdout.split()
    xs = subprocess.run(["rabbitmqctl", "-q", "list_exchanges", "name", "--no-table-headers"],
                        capture_output=True, text=True).stdout.split()
    conn = amqp_open()
    for name in out:
        if name.startswith(ns + "."):
            ch = conn.channel()
            ch.queue_delete(name)
            ch.close()
    for name in xs:
        if name.startswith(ns + "."):
            ch = conn.channel()
            ch.exchange_delete(name)
            ch.close()
    conn.close()
    keys = subprocess.run(["redis-cli", "--scan", "--pattern", ns + ":*"], capture_output=True,
                          text=True).stdout.split()
    for i in range(0, len(keys), 500):
        subprocess.run(["redis-cli", "DEL", *keys[i:i + 500]], capture_output=True)


# ---------------------------------------------------------------- one side

def run_side(side, latency, n, args, ns, run, stack_pids):
    mock, port = start_mock(args.build, latency, args.mock_threads)
    try:
        return measure_side(side, latency, n, args, ns, run, stack_pids, mock, port)
    finally:
        stop(mock)


def measure_side(side, latency, n, args, ns, run, stack_pids, mock, port):
    if side == "c":
        prefill_c(ns, run, n)
        cmd = [os.path.join(args.build, "bin", "integration-worker"), "submitter"]
        env = c_env(ns, port, args)
    else:
        env = celery_env(ns, port, args)
        prefill_celery(ns, run, n, env)
        cmd = [PY, "-m", "celery", "-A", "sbs_celery", "worker", "--pool", "threads",
               "--concurrency", str(args.concurrency), "--loglevel",
               {"warn": "WARNING"}.get(args.log_level, args.log_level.upper()),
               "--without-gossip", "--without-mingle", "--without-heartbeat",
               "--hostname", f"sbs-{os.getpid()}@%h", "--queues", ns + ".celery"]
    tap = Tap(ns)
    # The shared broker and Redis also serve other clients: their CPU rate in the
    # second before the worker starts is printed so a busy machine shows.
    b0 = {k: cpu_s(p) for k, p in stack_pids.items()}
    time.sleep(1.0)
    background = sum(cpu_s(p) - b0[k] for k, p in stack_pids.items())
    logpath = os.path.join(args.logdir, f"{side}-{latency}ms.log")
    with open(logpath, "w") as logf:
        worker = subprocess.Popen(cmd, env=env, stdout=logf, stderr=logf, cwd=HERE)
    try:
        pids = {"worker": worker.pid, "mock": mock.pid, **stack_pids}
        marks = {}

        def sample(tag):
            marks[tag] = {k: cpu_s(p) for k, p in pids.items()}
            marks[tag]["driver"] = sum(os.times()[:2])

        tap.wait(n, lambda: sample("first"), lambda: sample("last"), args.timeout,
                 lambda: worker.poll() is None)
        rss = peak_rss_mb(worker.pid)
        stats = mock_stats(port)
    finally:
        stop(worker)
        tap.close()
    got = len(tap.seen)
    if got < n or "last" not in marks:
        log(f"sidebyside: {side} at {latency} ms: {got} of {n} accepted, {tap.failed} failed "
            f"(log: {logpath})")
        return None
    secs = tap.last - tap.first
    d = {k: marks["last"][k] - marks["first"][k] for k in marks["first"]}
    per_k = 1000.0 / (n - 1)
    res = {
        "jobs_s": (n - 1) / secs if secs > 0 else float("nan"),
        "worker_cpu": d["worker"] * per_k,
        "stack_cpu": sum(d[k] for k in pids) * per_k,
        "broker_cpu": d["rabbitmq"] * per_k,
        "rss": rss,
        "created": stats.get("submissions_created"),
        "dups": tap.dups,
        "secs": secs,
        "background": background,
        "driver": d["driver"] * per_k,
    }
    log(f"  {side:6} {latency:4} ms: {n} jobs in {secs:.2f} s, {res['jobs_s']:.0f} jobs/s, worker "
        f"{res['worker_cpu']:.3f} s/1k, stack {res['stack_cpu']:.3f} s/1k (rabbitmq "
        f"{res['broker_cpu']:.3f}), peak RSS {rss:.1f} MB, mock created {res['created']}, "
        f"duplicate events {tap.dups}; this script's tap {res['driver']:.2f} s/1k; RabbitMQ+Redis "
        f"busy {background:.2f} CPU s/s before the worker started")
    return res


# ---------------------------------------------------------------- ceilings

WRK_LUA = r"""
local n = 0
local tid = 0
function setup(thread) thread:set("tid", tid); tid = tid + 1 end
function request()
  n = n + 1
  local body = '{"user_id":"u-1","action_type":"transaction","request_data":{"amount":' .. n ..
    ',"currency":"EUR"},"client_info":{"client_id":"integration-worker","timestamp":"2026-01-01T00:00:00.000Z"}}'
  return wrk.format("POST", "/api/v1/external-resource",
    {["Content-Type"] = "application/json", ["X-API-Key"] = "test-key-xxxxx",
     ["X-API-Secret"] = "test-secret-xxxxx", ["Idempotency-Key"] = "wrk-" .. tid .. "-" .. n}, body)
end
"""


def mock_ceiling(args):
    mock, port = start_mock(args.build, 0, args.mock_threads)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_LUA)
        script = f.name
    out = subprocess.run(["wrk", "-t", "1", "-c", str(args.concurrency), "-d",
                          f"{args.ceiling_seconds}s", "-s", script, f"http://127.0.0.1:{port}"],
                         capture_output=True, text=True).stdout
    os.unlink(script)
    stats = mock_stats(port)
    stop(mock)
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    created = stats.get("submissions_created", 0)
    rate = float(m.group(1)) if m else float("nan")
    log(f"  mock alone: {rate:.0f} POST/s (wrk -t1 -c{args.concurrency}, "
        f"{args.ceiling_seconds} s; mock created {created})")
    return rate


def broker_ceiling(args, ns, n):
    out = subprocess.run([os.path.join(args.build, "bin", "bench_broker"), "--namespace",
                          ns + ".brk", "--jobs", str(n), "--prefetch",
                          str(2 * args.concurrency)], capture_output=True, text=True)
    m = re.search(r"jobs/s=([\d.]+)", out.stdout)
    if out.returncode != 0 or not m:
        log(f"sidebyside: bench_broker failed: {out.stdout}{out.stderr}")
        return float("nan")
    log("  broker alone: " + out.stdout.strip())
    return float(m.group(1))


# ---------------------------------------------------------------- main

def fmt(v, digits=0):
    if v is None or v != v:
        return "n/a"
    return f"{v:,.{digits}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", default="5000,2000",
                    help="jobs per side, one number or one per latency (default 5000,2000)")
    ap.add_argument("--latency-ms", default="0,200", help="provider latencies (default 0,200)")
    ap.add_argument("--concurrency", type=int, default=64,
                    help="IW_CONCURRENCY of the C worker = Celery threads (default 64)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warn", "error"],
                    help="both workers' log level (default info)")
    ap.add_argument("--celery-wake", default="pipe",
                    help="celery/celery#6941 workaround: pipe, tick:MS or none (default pipe)")
    ap.add_argument("--mock-threads", type=int, default=2, help="mock-provider --threads")
    ap.add_argument("--ceiling-seconds", type=int, default=5, help="wrk duration (default 5)")
    ap.add_argument("--no-ceilings", action="store_true", help="skip the ceiling measurements")
    ap.add_argument("--sides", default="c,celery", help="which sides to run (default c,celery)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per side and latency")
    ap.add_argument("--build", default=os.path.join(ROOT, "build"), help="CMake build dir")
    args = ap.parse_args()

    latencies = [int(x) for x in args.latency_ms.split(",")]
    jobs = [int(x) for x in args.jobs.split(",")]
    if len(jobs) == 1:
        jobs *= len(latencies)
    if len(jobs) != len(latencies) or min(jobs) < 2:
        sys.exit("sidebyside: --jobs needs one number (>= 2) or one per latency")
    sides = args.sides.split(",")
    ns = f"t-sbs-{os.getpid()}"
    args.logdir = tempfile.mkdtemp(prefix=ns + "-")
    stack_pids = {"rabbitmq": listener_pid(5672), "redis": listener_pid(6379)}
    log(f"sidebyside: namespace {ns}, logs in {args.logdir}")

    results, ceil_mock, ceil_broker = {}, None, None
    try:
        subprocess.run([os.path.join(args.build, "bin", "integration-worker"), "declare"],
                       env=c_env(ns, 1, args), check=True, capture_output=True)
        if not args.no_ceilings:
            ceil_mock = mock_ceiling(args)
            ceil_broker = broker_ceiling(args, ns, max(jobs))
        run = 0
        for lat, n in zip(latencies, jobs):
            for side in sides:
                run += 1
                results[(side, lat)] = run_side(side, lat, n, args, ns, run, stack_pids)
    finally:
        delete_namespace(ns)

    # ---- the table
    load = open("/proc/loadavg").read().split()[:3]
    cpu = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read())
    print()
    print(f"Side by side, {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs "
          f"({cpu.group(1) if cpu else '?'}), load average {' '.join(load)}")
    print(f"concurrency {args.concurrency} (C: IW_CONCURRENCY; Celery: --pool threads "
          f"--concurrency), log level {args.log_level}, Celery #6941 workaround: "
          f"{args.celery_wake}")
    print()
    print("| provider latency | figure | integration-worker | Celery | C/Celery |")
    print("|---|---|---:|---:|---:|")
    rows = [("jobs/s", "jobs_s", 0, True),
            ("worker CPU s per 1,000 jobs", "worker_cpu", 3, False),
            ("stack CPU s per 1,000 jobs", "stack_cpu", 3, False),
            ("  of which RabbitMQ", "broker_cpu", 3, False),
            ("worker peak RSS MB", "rss", 1, False)]
    for lat, n in zip(latencies, jobs):
        c, py = results.get(("c", lat)), results.get(("celery", lat))
        for label, key, dig, _ in rows:
            cv = c[key] if c else None
            pv = py[key] if py else None
            ratio = (cv / pv) if (cv is not None and pv) else None
            print(f"| {lat} ms ({n:,} jobs) | {label} | {fmt(cv, dig)} | {fmt(pv, dig)} | "
                  f"{fmt(ratio, 2)} |")
    if not args.no_ceilings:
        print()
        print(f"Ceilings in the same run: mock alone {fmt(ceil_mock)} POST/s (wrk, "
              f"{args.concurrency} connections); broker alone {fmt(ceil_broker)} jobs/s for the "
              f"job's message mix (bench_broker); at latency L the concurrency bounds either "
              f"worker to {args.concurrency} / L jobs/s"
              + "".join(f"; {lat} ms: {args.concurrency * 1000 / lat:,.0f}" for lat in latencies
                        if lat > 0) + ".")
    print("CPU is read from /proc in ticks of 1/%d s; a tick per 1,000 jobs is %s."
          % (TICK, ", ".join(f"{1000.0 / TICK / (n - 1):.3f} CPU s at {lat} ms"
                             for lat, n in zip(latencies, jobs))))
    bg = [f"{s} {lat} ms {r['background']:.2f}" for (s, lat), r in results.items() if r]
    print("RabbitMQ + Redis CPU s/s in the second before each worker started (other clients of "
          "the shared servers): " + ", ".join(bg) + ".")
    ok = all(results.get((s, lat)) for s in sides for lat in latencies)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
