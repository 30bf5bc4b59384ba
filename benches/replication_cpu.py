#!/usr/bin/env python3
"""CPU per applied transaction of each replicator, from /proc, while pgbench runs.

Wraps a command (normally ../shared/bench/native-logical/run.sh) and samples
every process's CPU time (utime + stime from /proc/PID/stat) every 100 ms.
Each window in which a `pgbench` process is alive is one load phase (the
harness runs one per target: native first, then external). Per window it
prints the CPU seconds of:
  - apply:     the native subscriber's apply worker ("logical replication ..."
                worker processes of the subscriber cluster),
  - ours:      the `pglite-cache` process (all its threads),
  - walsender: the publisher's walsender processes (one per subscriber),
and, when the wrapped command prints the harness's JSON, the transactions
pgbench committed in that window, so CPU per applied transaction follows.

With --reader-probe, a reader of the target also runs in each window: one
client querying the newest heartbeat row 100 times a second (`pgbench -R 100
-l`, 1 s after the window opens, for 8 s), over the target's own socket
(the native subscriber's TCP port, the cache's Unix socket). Its latency
percentiles say how long a reader waits while the apply runs: the issue's
"a reader must not wait long behind the apply". (With -R, pgbench counts a
query's latency from its scheduled start.) The probe's queries add to the
target's CPU, the same for both.

Usage (as root, from the project root):
  python3 benches/replication_cpu.py [--reader-probe] -- ../shared/bench/native-logical/run.sh --target native,external ...
"""

import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

TICK = os.sysconf("SC_CLK_TCK")


def snapshot():
    """{pid: (class, cpu_seconds)} for the processes we care about, plus pgbench alive."""
    out, pgbench = {}, False
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICK
        # Only the harness's own processes: other people's tests on a shared
        # machine run pgbench, walsenders and `pglite-cache sync` too.
        if cmd.startswith("pgbench") or "/pgbench " in cmd:
            pgbench = pgbench or f"-p {PUB_PORT}" in cmd
        elif "logical replication" in cmd and "launcher" not in cmd and harness_child(fields[1]):
            out[pid] = ("apply", cpu)
        elif "walsender" in cmd and harness_child(fields[1]):
            out[pid] = ("walsender", cpu)
        elif "pglite-cache" in cmd and " sync " in cmd and "bench_ext" in cmd:
            out[pid] = ("ours", cpu)
    return out, pgbench


PUB_PORT = 55432


def harness_child(ppid):
    """Whether the parent (postmaster) runs a cluster of the harness (/tmp/native-logical-*)."""
    try:
        with open(f"/proc/{ppid}/cmdline", "rb") as f:
            return b"native-logical-" in f.read()
    except OSError:
        return False


PROBE_SQL = "SELECT id FROM heartbeat ORDER BY id DESC LIMIT 1;\n"


def target_address():
    """pgbench connection flags of the replicator running now: our daemon's
    socket (from its command line), else the harness's subscriber cluster
    (its port from the postgresql.conf the harness appended to)."""
    subscriber = None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any("pglite-cache" in a for a in argv) and "sync" in argv and "--socket-dir" in argv:
            return ["-h", argv[argv.index("--socket-dir") + 1], "-p", argv[argv.index("--port") + 1]]
        if "-D" in argv and argv[argv.index("-D") + 1].endswith("/sub") and "native-logical-" in " ".join(argv):
            subscriber = argv[argv.index("-D") + 1]
    if subscriber:
        with open(os.path.join(subscriber, "postgresql.conf")) as f:
            ports = re.findall(r"^port = (\d+)", f.read(), re.M)
        return ["-h", "127.0.0.1", "-p", ports[-1]]
    return None


def probe(window):
    """Runs the reader probe against the current target; stores latencies (ms) in the window."""
    time.sleep(1)
    address = target_address()
    if address is None:
        window["probe_error"] = "no target found"
        return
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "probe.sql")
        with open(script, "w") as f:
            f.write(PROBE_SQL)
        r = subprocess.run(["pgbench", "-n", *address, "-U", "postgres", "-f", script, "-c1", "-R", "100",
                            "-T", "8", "-l", "--log-prefix", os.path.join(tmp, "probe"), "postgres"],
                           capture_output=True, text=True)
        lat = []
        for name in glob.glob(os.path.join(tmp, "probe*")):
            if name != script:
                with open(name) as f:
                    lat += [int(line.split()[2]) / 1000 for line in f if line.strip()]
        if r.returncode != 0 or not lat:
            window["probe_error"] = r.stderr[-300:]
        window["probe"] = sorted(lat)


def pct(xs, p):
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]


def main():
    if "--" not in sys.argv:
        raise SystemExit(__doc__)
    reader_probe = "--reader-probe" in sys.argv[:sys.argv.index("--")]
    cmd = sys.argv[sys.argv.index("--") + 1:]
    windows, current, stop, probes = [], None, threading.Event(), []

    def sample():
        nonlocal current
        while not stop.is_set():
            procs, load = snapshot()
            now = time.time()
            if load and current is None:
                current = {"start": now, "first": procs, "last": procs}
                if reader_probe:
                    probes.append(threading.Thread(target=probe, args=(current,), daemon=True))
                    probes[-1].start()
            elif load:
                for pid, v in procs.items():
                    current["first"].setdefault(pid, (v[0], 0.0) if now - current["start"] > 0.3 else v)
                current["last"] = {**current["last"], **procs}
            elif current is not None:
                current["end"] = now
                windows.append(current)
                current = None
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    stop.set()
    th.join(2)
    for t in probes:
        t.join(15)
    sys.stdout.write(proc.stdout)
    runs = []
    for line in proc.stdout.splitlines():
        try:
            runs = json.loads(line).get("runs", [])
        except (ValueError, AttributeError):
            continue
    print("\n| load window | target | pgbench TPS | transactions | CPU s: apply worker | pglite-cache | walsender "
          "| CPU ms per 1000 txns (replicator) |")
    print("|---|---|---|---|---|---|---|---|")
    for i, w in enumerate(windows):
        cpu = {"apply": 0.0, "ours": 0.0, "walsender": 0.0}
        for pid, (kind, last) in w["last"].items():
            first = w["first"].get(pid, (kind, last))[1]
            cpu[kind] += last - first
        run = runs[i] if i < len(runs) else {}
        c = run.get("C_pgbench", {})
        txns = c.get("transactions")
        rep = cpu["apply"] + cpu["ours"]
        per = f"{rep * 1e6 / txns:.0f}" if txns else "?"
        print(f"| {i + 1} ({w['end'] - w['start']:.1f} s) | {run.get('target', '?')} | {c.get('tps', '?')} | "
              f"{txns or '?'} | {cpu['apply']:.2f} | {cpu['ours']:.2f} | {cpu['walsender']:.2f} | {per} |")
    if reader_probe:
        print("\n| load window | target | reader queries | latency ms: p50 | p90 | p99 | max |")
        print("|---|---|---|---|---|---|---|")
        for i, w in enumerate(windows):
            run = runs[i] if i < len(runs) else {}
            lat = w.get("probe") or []
            if not lat:
                print(f"| {i + 1} | {run.get('target', '?')} | 0 ({w.get('probe_error', 'no samples')!r}) | | | | |")
                continue
            print(f"| {i + 1} | {run.get('target', '?')} | {len(lat)} | {pct(lat, 50):.2f} | {pct(lat, 90):.2f} | "
                  f"{pct(lat, 99):.2f} | {lat[-1]:.2f} |")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
