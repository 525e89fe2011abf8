"""Restart latency of a killed or hung worker, against the floor of starting a worker process.

  .venv/bin/python bench/bench_restart.py [--kills 20] [--stops 5]

- floor: spawn a Python that imports what the MQTT worker imports, and wait for it to exit;
- SIGKILL of the MQTT worker -> the replacement's hello (seen as the supervisor's STATUS change
  to running, on a NOTIFY_SOCKET the benchmark binds);
- SIGSTOP of the health worker -> the replacement's hello, with the default timeouts
  (heartbeat 2 s, hang 10 s): target at most the hang timeout + 0.5 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

from common import header, median, pct, started_tree, workdir


def floor(n: int) -> list[float]:
    code = "import infoscreen.workers.mqtt.worker, infoscreen.workers.runtime"
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        out.append(time.perf_counter() - t0)
    return out


def restarts_seen(tree, name: str) -> int:
    import re

    vals = tree.notify.values("STATUS")
    for v in reversed(vals):
        m = re.search(rf"{name}=running\(restarts=(\d+)\)", v)
        if m:
            return int(m.group(1))
    return -1


def kill_to_hello(tree, name: str, sig: int, count: int, settle: float) -> list[float]:
    out = []
    for i in range(count):
        # Let the current worker be ready for the stable period, so it is restarted at once.
        tree.notify.wait_status(lambda s: f"{name}=running" in s, timeout=30)
        time.sleep(settle)  # the policy's stable_after_s: part of the scenario, not a sync
        pid = tree.worker_pid(name)
        before = restarts_seen(tree, name)
        t0 = time.monotonic()
        os.kill(pid, sig)
        t1 = tree.notify.wait_for(
            lambda recs: next((t for t, l in recs if t > t0 and l.startswith("STATUS=")
                               and f"{name}=running(restarts={before + 1})" in l), None),
            timeout=60, what="replacement hello")
        out.append(t1 - t0)
        if sig == signal.SIGSTOP:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--stops", type=int, default=5)
    args = ap.parse_args()
    work = workdir()
    fl = floor(args.kills)
    broker, tree, _ = started_tree(work, env={"SUPERVISOR_MAX_RESTARTS": "10000", "WORKER_HEARTBEAT_S": "2",
                                              "WORKER_HANG_TIMEOUT_S": "10"})
    try:
        kills = kill_to_hello(tree, "mqtt", signal.SIGKILL, args.kills, settle=2.1)
        stops = kill_to_hello(tree, "health", signal.SIGSTOP, args.stops, settle=2.1) if args.stops else []
    finally:
        tree.cleanup()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    ms = lambda v: f"{v * 1000:.0f} ms"  # noqa: E731
    print(header("Worker restart latency (issue 2)"))
    print("| measure | n | median | p90 | max |\n|---|---|---|---|---|")
    print(f"| floor: start a Python importing the worker's modules | {len(fl)} | {ms(median(fl))} | {ms(pct(fl, 90))} | {ms(max(fl))} |")
    print(f"| SIGKILL mqtt worker -> replacement hello | {len(kills)} | {ms(median(kills))} | {ms(pct(kills, 90))} | {ms(max(kills))} |")
    if stops:
        print(f"| SIGSTOP health worker -> replacement hello (hang timeout 10 s) | {len(stops)} | {ms(median(stops))} | {ms(pct(stops, 90))} | {ms(max(stops))} |")
    print(f"\nmedian kill->hello / floor = {median(kills) / median(fl):.2f} (target <= 1.3)")
    if stops:
        print(f"max SIGSTOP->hello = {max(stops):.2f} s (target <= 10.5 s)")


if __name__ == "__main__":
    main()
