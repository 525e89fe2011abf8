"""Flood: 1000 invalid commands per second for 10 s while the whole tree runs.

    .venv/bin/python bench/bench_flood.py [--rate 1000] [--seconds 10]

Half the payloads have no readable command_id (no ack: a rate-limited logs/warn), half have one
but an unknown action (a `failed` `unsupported_action` ack on both ack topics, through the
outbox). Measured: heartbeat periods (HEARTBEAT_INTERVAL_S=1) seen by a server client, WATCHDOG=1
datagrams on the NOTIFY_SOCKET the bench binds (WATCHDOG_USEC=2 s: petted every 1 s), the MQTT
worker's RSS every second, acks and log records received, worker restarts.
Results: bench/results/flood.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid as uuidlib

import psutil
from common import report, ROOT, client, machine, subscribe, workdir

from tests.support.broker import MosquittoBroker
from tests.support.tree import Tree


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "flood.md"))
    args = ap.parse_args()
    dev = str(uuidlib.uuid4())
    broker = MosquittoBroker([dev], workdir("bench-broker-")).start()
    tree = Tree(workdir("bench-tree-"), broker, dev, watchdog_usec=2_000_000,
                env={"HEARTBEAT_INTERVAL_S": "1", "HEALTH_INTERVAL_S": "5"})
    heartbeats: list[float] = []
    counts = {"acks": 0, "warn_logs": 0, "dropped_reported": 0}
    lock = threading.Lock()

    def on_msg(c, ud, m):
        t = time.monotonic()
        with lock:
            if m.topic.endswith("/heartbeat"):
                heartbeats.append(t)
            elif m.topic.endswith("/ack"):
                counts["acks"] += 1
            elif "/logs/" in m.topic:
                counts["warn_logs"] += 1
                counts["dropped_reported"] += json.loads(m.payload).get("dropped_before", 0)

    rss: list[tuple[float, int]] = []
    try:
        tree.start()
        mqtt_pid = tree.worker_pid("mqtt")
        proc = psutil.Process(mqtt_pid)
        srv = client(broker, broker.server_user, broker.server_password)
        srv.on_message = on_msg
        for t in ("heartbeat", "commands/ack", "command/ack", "logs/#"):
            subscribe(srv, f"infoscreen/{dev}/{t}")
        pub = client(broker, broker.server_user, broker.server_password)
        # Warm-up: 3 s of normal operation.
        t_start = time.monotonic()
        while time.monotonic() - t_start < 3:
            rss.append((time.monotonic() - t_start, proc.memory_info().rss))
            time.sleep(1)  # sampling tick of the bench itself (not a test)
        wd_mark = len(tree.notify.records)
        flood_t0 = time.monotonic()
        sent = 0
        n_total = int(args.rate * args.seconds)
        next_sample = flood_t0
        while sent < n_total:
            now = time.monotonic()
            due = int((now - flood_t0) * args.rate) + 1
            while sent < min(due, n_total):
                if sent % 2:
                    payload = json.dumps({"command_id": str(uuidlib.uuid4()), "action": "self_destruct",
                                          "expires_at": "2099-01-01T00:00:00Z"}).encode()
                else:
                    payload = b"\x00garbage " + str(sent).encode()
                pub.publish(f"infoscreen/{dev}/commands", payload, qos=1)
                sent += 1
            if now >= next_sample:
                rss.append((now - t_start, proc.memory_info().rss))
                next_sample += 1.0
            time.sleep(0.001)  # pacing of the load generator
        flood_t1 = time.monotonic()
        # Drain: 5 s after the flood.
        while time.monotonic() - flood_t1 < 5:
            rss.append((time.monotonic() - t_start, proc.memory_info().rss))
            time.sleep(1)
        alive = proc.is_running() and tree.workers().get("mqtt") == mqtt_pid
        wd = [t for t, line in tree.notify.records[wd_mark:] if line == "WATCHDOG=1"]
        for c in (srv, pub):
            c.loop_stop()
            c.disconnect()
    finally:
        tree.cleanup()
        broker.stop()
    during = [t for t in heartbeats if flood_t0 <= t <= flood_t1 + 1]
    gaps = [b - a for a, b in zip(during, during[1:])]
    wd_during = [t for t in wd if flood_t0 <= t <= flood_t1]
    wd_gaps = [b - a for a, b in zip(wd, wd[1:])]
    rss_mb = [r / 2**20 for _, r in rss]
    lines = [
        "# Flood of invalid commands (bench/bench_flood.py)",
        "",
        machine(),
        f"- command: `.venv/bin/python bench/bench_flood.py --rate {args.rate} --seconds {args.seconds:g}`",
        f"- load: {sent} payloads in {flood_t1 - flood_t0:.2f} s ({sent / (flood_t1 - flood_t0):.0f}/s), QoS 1, "
        "half unreadable (no ack, rate-limited logs/warn), half `unsupported_action` (failed ack on both topics)",
        "",
        "| figure | value |",
        "|---|---|",
        f"| heartbeats during the flood (period 1 s) | {len(during)}; gaps min {min(gaps):.3f} s, "
        f"max {max(gaps):.3f} s |" if gaps else "| heartbeats during the flood | none |",
        f"| WATCHDOG=1 during the flood (every 1 s expected) | {len(wd_during)}; max gap over the run "
        f"{max(wd_gaps) if wd_gaps else float('nan'):.3f} s |",
        f"| MQTT worker RSS (MiB) | before {rss_mb[0]:.1f}, max {max(rss_mb):.1f}, end {rss_mb[-1]:.1f} |",
        f"| acks received (both topics; expected {sent // 2 * 2}) | {counts['acks']} |",
        f"| logs records received / drops they reported | {counts['warn_logs']} / {counts['dropped_reported']} |",
        f"| MQTT worker still the same process | {alive} |",
        "",
    ]
    report("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
