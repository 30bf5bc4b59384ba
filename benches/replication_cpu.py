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

Usage (as root, from the project root):
  python3 benches/replication_cpu.py -- ../shared/bench/native-logical/run.sh --target native,external ...
"""

import json
import os
import subprocess
import sys
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


def main():
    if "--" not in sys.argv:
        raise SystemExit(__doc__)
    cmd = sys.argv[sys.argv.index("--") + 1:]
    windows, current, stop = [], None, threading.Event()

    def sample():
        nonlocal current
        while not stop.is_set():
            procs, load = snapshot()
            now = time.time()
            if load and current is None:
                current = {"start": now, "first": procs, "last": procs}
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
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
