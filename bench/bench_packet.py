"""The MQTT worker's memory under the largest publishes the broker can still send it.

    .venv/bin/python bench/bench_packet.py [--n 200]

The whole tree against the provisioned broker. The largest payload the broker accepts on the
device's group events topic is found first (PUBACK < 128, by bisection up to the worker's
Maximum Packet Size); then the server publishes `n` of that size to the events topic and `n`
to the commands topic, as fast as the broker takes them, while the worker's RSS is sampled
every 10 ms. Then a hostile peer (not a broker: a TCP server that announces a 255 MiB PUBLISH,
which a real broker never sends past the client's Maximum Packet Size) is pointed at a second
worker, and its RSS is read before and after. Results: bench/results/packet.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib

import psutil
from common import ROOT, client, header, report, started_tree, subscribe, workdir

from infoscreen.workers.mqtt.connection import MAX_PACKET_BYTES


def _publish(c, topic: str, payload: bytes, timeout: float = 10.0) -> int:
    done = threading.Event()
    rc: list[int] = []
    prev = c.on_publish

    def on_publish(cl, ud, mid, reason, props):
        rc.append(int(getattr(reason, "value", reason)))
        done.set()

    c.on_publish = on_publish
    info = c.publish(topic, payload, qos=1)
    info.wait_for_publish(timeout)
    done.wait(timeout)
    c.on_publish = prev
    return rc[0] if rc else 255


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.samples: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append(self.proc.memory_info().rss)
            except psutil.Error:
                return
            self.stop.wait(0.01)


def hostile_rss() -> tuple[float, float]:
    """RSS (MiB) of a lone MQTT worker before and after a peer announced a 255 MiB PUBLISH."""
    sys.path.insert(0, str(ROOT))
    from tests.mqtt.test_intake import HostileBroker

    hostile = HostileBroker()
    work = tempfile.mkdtemp(prefix="bench-hostile-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "INFOSCREEN_", "HELPER_"))}
    env.update({"CLIENT_UUID": str(uuidlib.uuid4()), "MQTT_BROKER": "127.0.0.1", "MQTT_PORT": str(hostile.port),
                "INFOSCREEN_ENV": "test", "INFOSCREEN_STATE_DIR": f"{work}/state",
                "INFOSCREEN_RUNTIME_DIR": f"{work}/run"})
    # Without a supervisor the worker still connects (its IPC sends drop); it is what we measure.
    proc = subprocess.Popen([sys.executable, "-m", "infoscreen.workers.mqtt"], env=env, cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        before = None
        while time.monotonic() < deadline and not hostile.connect_packet:
            before = psutil.Process(proc.pid).memory_info().rss
            time.sleep(0.005)
        hostile.closed.wait(20)
        after = psutil.Process(proc.pid).memory_info().rss
        return (before or 0) / 2**20, after / 2**20
    finally:
        proc.kill()
        proc.wait()
        hostile.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "packet.md"))
    args = ap.parse_args()
    broker, tree, dev = started_tree(workdir())
    try:
        srv = client(broker, broker.server_user, broker.server_password)
        subscribe(srv, f"infoscreen/{dev}/heartbeat")
        srv.publish(f"infoscreen/{dev}/group_id", b"bench", qos=1, retain=True).wait_for_publish(5)
        time.sleep(0.5)  # the worker's subscription to the group's events (bench only)
        topic = "infoscreen/events/bench"
        lo, hi = 1024, MAX_PACKET_BYTES
        while hi - lo > 256:   # the largest payload the broker still accepts on that topic
            mid = (lo + hi) // 2
            if _publish(srv, topic, b"x" * mid) < 128:
                lo = mid
            else:
                hi = mid
        largest = lo
        pid = tree.worker_pid("mqtt")
        sampler = Sampler(pid)
        rss0 = psutil.Process(pid).memory_info().rss
        sampler.start()
        t0 = time.monotonic()
        body = b'{"event_id": 1, "pad": "' + b"x" * (largest - 32) + b'"}'
        for _ in range(args.n):
            srv.publish(topic, body[:largest], qos=1)
        for _ in range(args.n):
            srv.publish(f"infoscreen/{dev}/commands", body[:largest], qos=1)
        _publish(srv, topic, b"{}")  # in order after the others: all were sent
        time.sleep(1.0)  # let the worker drain what the broker queued (bench only)
        sampler.stop.set()
        sampler.join()
        took = time.monotonic() - t0
        rss1 = psutil.Process(pid).memory_info().rss
        alive = tree.worker_pid("mqtt") == pid
        srv.publish(topic, b"", qos=1, retain=True)
        srv.publish(f"infoscreen/{dev}/group_id", b"", qos=1, retain=True).wait_for_publish(5)
        srv.disconnect()
    finally:
        tree.cleanup()
        broker.stop()
    h_before, h_after = hostile_rss()
    mib = 2**20
    text = (header("MQTT worker RSS under the largest publishes") +
            f"\n- largest payload the broker accepted on the events topic: {largest} bytes "
            f"(worker's Maximum Packet Size {MAX_PACKET_BYTES})\n"
            f"- {args.n} of them on the events topic and {args.n} on the commands topic in {took:.2f} s\n\n"
            "| measure | MiB |\n|---|---|\n"
            f"| RSS before | {rss0 / mib:.1f} |\n| RSS peak (10 ms samples, n={len(sampler.samples)}) | "
            f"{max(sampler.samples) / mib:.1f} |\n| RSS after | {rss1 / mib:.1f} |\n"
            f"| hostile peer announcing 255 MiB: RSS before / after | {h_before:.1f} / {h_after:.1f} |\n\n"
            f"worker restarted during the run: {'no' if alive else 'YES'}\n")
    report(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
