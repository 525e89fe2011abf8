"""Command latency through the whole tree, against the floor of a bare paho round trip.

    .venv/bin/python bench/bench_commands.py [--n 1000]

Whole tree (supervisor, MQTT worker, health worker, the real helper in mock mode with its
reboot-loop breaker raised) against a real Mosquitto provisioned like production. For each of N
commands, published one at a time by a server-account client: the time from publish() to the
arrival of its `accepted` ack and of its `execution_started` ack (each command waits for its
`completed` before the next, so none is `busy`). The floor, measured in the same run through the
same broker: the server-account client publishes on a second device's commands topic, a bare paho
client with that device's account echoes it on the device's ack topic, the server receives it.
Every client sets TCP_NODELAY; the broker has set_tcp_nodelay. Results: bench/results/commands.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid as uuidlib

from common import report, ROOT, client, machine, now_iso, subscribe, summary_ms, pct, workdir

from tests.support.broker import MosquittoBroker
from tests.support.tree import Tree


def floor(broker, echo_uuid: str, n: int) -> list[float]:
    srv = client(broker, broker.server_user, broker.server_password)
    echo = client(broker, broker.device_user(echo_uuid), broker.device_password(echo_uuid))
    cmd_topic, ack_topic = f"infoscreen/{echo_uuid}/commands", f"infoscreen/{echo_uuid}/commands/ack"
    echo.on_message = lambda c, ud, m: c.publish(ack_topic, m.payload, qos=1)
    subscribe(echo, cmd_topic)
    got = threading.Event()
    t_recv = [0.0]

    def on_ack(c, ud, m):
        t_recv[0] = time.perf_counter()
        got.set()

    srv.on_message = on_ack
    subscribe(srv, ack_topic)
    out = []
    for i in range(n + 50):
        got.clear()
        payload = json.dumps({"command_id": str(uuidlib.uuid4()), "action": "reboot_host",
                              "expires_at": now_iso(60)}).encode()
        t0 = time.perf_counter()
        srv.publish(cmd_topic, payload, qos=1)
        if not got.wait(5):
            raise RuntimeError("floor: echo lost")
        if i >= 50:  # warm-up
            out.append(t_recv[0] - t0)
    for c in (srv, echo):
        c.loop_stop()
        c.disconnect()
    return out


def through_tree(broker, uuid: str, n: int) -> tuple[list[float], list[float], list[float]]:
    """Signed commands, as a provisioned fleet sends them: the helper holds the device's key."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from infoscreen.wire import signing

    key = broker.device_key(uuid)
    srv = client(broker, broker.server_user, broker.server_password)
    lock = threading.Condition()
    seen: dict[str, dict[str, float]] = {}

    def on_ack(c, ud, m):
        t = time.perf_counter()
        a = json.loads(m.payload)
        with lock:
            seen.setdefault(a["command_id"], {}).setdefault(a["status"], t)
            lock.notify_all()

    srv.on_message = on_ack
    subscribe(srv, f"infoscreen/{uuid}/commands/ack")
    acc, started, completed = [], [], []
    for i in range(n + 50):
        cid = str(uuidlib.uuid4())
        payload = json.dumps({"schema_version": "1.0", "command_id": cid, "client_uuid": uuid,
                              "action": "reboot_host", "issued_at": now_iso(), "expires_at": now_iso(120)}).encode()
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [(signing.SIGNATURE_PROPERTY, signing.sign(key, payload))]
        t0 = time.perf_counter()
        srv.publish(f"infoscreen/{uuid}/commands", payload, qos=1, properties=props)
        with lock:
            ok = lock.wait_for(lambda: "completed" in seen.get(cid, {}) or "failed" in seen.get(cid, {}), 10)
        if not ok:
            raise RuntimeError(f"command {i} got no terminal ack: {seen.get(cid)}")
        s = seen[cid]
        if "failed" in s:
            raise RuntimeError(f"command {i} failed")
        if i >= 50:
            acc.append(s["accepted"] - t0)
            started.append(s["execution_started"] - t0)
            completed.append(s["completed"] - t0)
    srv.loop_stop()
    srv.disconnect()
    return acc, started, completed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "commands.md"))
    ap.add_argument("--plaintext", action="store_true",
                    help="a plaintext listener (the first round's conditions) instead of provision's TLS default")
    args = ap.parse_args()
    dev, echo_dev = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    broker = MosquittoBroker([dev, echo_dev], workdir("bench-broker-"), tls=not args.plaintext).start()
    key_file = str(broker.device_key_path(dev))
    tree = Tree(workdir("bench-tree-"), broker, dev, env={"HEALTH_INTERVAL_S": "30", "HEARTBEAT_INTERVAL_S": "30",
                                                            "HELPER_COMMAND_KEY_FILE": key_file})
    tree.helper.env["HELPER_COMMAND_KEY_FILE"] = key_file
    try:
        tree.start()
        # Interleave to share conditions: floor, tree, floor.
        f1 = floor(broker, echo_dev, args.n // 2)
        acc, started, completed = through_tree(broker, dev, args.n)
        f2 = floor(broker, echo_dev, args.n - args.n // 2)
    finally:
        tree.cleanup()
        broker.stop()
    fl = f1 + f2
    p50f = pct(fl, 50)
    ratio_acc = pct(acc, 50) / p50f
    ratio_started = pct(started, 50) / p50f
    lines = [
        "# Command latency (bench/bench_commands.py)",
        "",
        machine(),
        f"- command: `.venv/bin/python bench/bench_commands.py --n {args.n}{' --plaintext' if args.plaintext else ''}`",
        "- broker: mosquitto 2.0.11, provisioned like production (accounts bound to client ids, ACLs, "
        f"set_tcp_nodelay true), loopback, {'plaintext' if args.plaintext else 'TLS (the fleet CA)'}",
        "- tree: supervisor + MQTT worker + health worker + real helper (mock mode, breaker raised),"
        " holding the device's command key: every command signed (HMAC-SHA256) and verified by it",
        "",
        "| path | latency |",
        "|---|---|",
        f"| floor: bare paho round trip (publish, echo, receive) | {summary_ms(fl)} |",
        f"| publish -> `accepted` ack | {summary_ms(acc)} |",
        f"| publish -> `execution_started` ack | {summary_ms(started)} |",
        f"| publish -> `completed` ack (mock helper) | {summary_ms(completed)} |",
        "",
        f"- p50 `accepted` / floor p50: **{ratio_acc:.2f}x**; `execution_started` / floor: **{ratio_started:.2f}x** "
        f"(target: within 3x)",
        f"- p99 `accepted` {pct(acc, 99) * 1000:.3f} ms, `execution_started` {pct(started, 99) * 1000:.3f} ms "
        f"(target: < 10 ms)",
        "",
    ]
    report("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
