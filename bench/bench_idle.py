"""An idle tree (workers up, broker connected): CPU, wake-ups and memory.

  .venv/bin/python bench/bench_idle.py [--seconds 60]

CPU is the sum of user+system time of the supervisor and both workers over the window, as a
share of one core; wake-ups are voluntary context switches per second; PSS sums the tree.
Default intervals (heartbeat 30 s, health 60 s, worker heartbeat 2 s) and the unit's watchdog
(WatchdogSec=60: a WATCHDOG=1 every 30 s).
"""

from __future__ import annotations

import argparse
import shutil
import time

import psutil

from common import header, started_tree, workdir


def procs(tree) -> list[psutil.Process]:
    sup = psutil.Process(tree.pid)
    return [sup, *sup.children()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    work = workdir()
    broker, tree, _ = started_tree(work, env={
        "HEARTBEAT_INTERVAL_S": "30", "HEALTH_INTERVAL_S": "60", "WORKER_HEARTBEAT_S": "2",
        "WORKER_HANG_TIMEOUT_S": "10"}, watchdog_usec=60_000_000)
    try:
        tree.notify.wait_status(lambda s: "broker=connected" in s, timeout=20)
        time.sleep(3)  # let start-up work settle before the window opens (part of the scenario)
        ps = procs(tree)
        t0 = time.monotonic()
        cpu0 = {p.pid: sum(p.cpu_times()[:2]) for p in ps}
        ctx0 = {p.pid: p.num_ctx_switches().voluntary for p in ps}
        time.sleep(args.seconds)  # the measurement window itself
        dt = time.monotonic() - t0
        rows = []
        total_cpu = total_wake = total_pss = 0.0
        for p in ps:
            cpu = sum(p.cpu_times()[:2]) - cpu0[p.pid]
            wake = (p.num_ctx_switches().voluntary - ctx0[p.pid]) / dt
            pss = p.memory_full_info().pss / 2**20
            name = "supervisor" if p.pid == tree.pid else next(
                (n for n in ("mqtt", "health") if f"infoscreen.workers.{n}" in p.cmdline()), "?")
            rows.append((name, cpu / dt * 100, wake, pss))
            total_cpu += cpu / dt * 100
            total_wake += wake
            total_pss += pss
    finally:
        tree.cleanup()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(header(f"Idle tree over {args.seconds:g} s (issue 2)"))
    print("| process | CPU % of one core | wake-ups/s | PSS MiB |\n|---|---|---|---|")
    for name, cpu, wake, pss in rows:
        print(f"| {name} | {cpu:.3f} | {wake:.1f} | {pss:.1f} |")
    print(f"| **tree** | **{total_cpu:.3f}** (target <= 1) | **{total_wake:.1f}** | **{total_pss:.1f}** (target <= 80) |")


if __name__ == "__main__":
    main()
