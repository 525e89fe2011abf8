"""Shared by the benchmarks: machine facts, statistics, a broker and the whole tree (tests/support),
and a threaded paho client for the server's side."""

from __future__ import annotations

import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: E402

from infoscreen.mqttclient import tls_context  # noqa: E402
from infoscreen.wire.schema import format_utc  # noqa: E402


def machine() -> str:
    """Markdown lines: the machine, CPU, Python and date of this run."""
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True).stdout.strip()
    return (f"- machine: `{uname}`\n- CPU: {cpu} ({os.cpu_count()} CPUs)\n"
            f"- python: {platform.python_version()} ({sys.executable})\n"
            f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%SZ')}\n")


def header(title: str) -> str:
    return f"### {title}\n\n{machine()}- command: `.venv/bin/python {' '.join(sys.argv)}`\n"


def pct(values: list[float], p: float) -> float:
    """The p-th percentile, linearly interpolated between the nearest ranks."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values)


def summary_ms(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (f"n={len(ms)} p50={pct(ms, 50):.3f} ms p90={pct(ms, 90):.3f} ms p99={pct(ms, 99):.3f} ms "
            f"max={max(ms):.3f} ms mean={statistics.fmean(ms):.3f} ms")


def report(text: str, out: str | None = None) -> None:
    """Print a result block, and keep a copy in `out` (bench/results/ is not committed)."""
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)


def workdir(prefix: str = "infoscreen-bench-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def now_iso(offset: float = 0.0) -> str:
    return format_utc(time.time() + offset)


def started_tree(work: Path, env: dict[str, str] | None = None, helper_env: dict[str, str] | None = None,
                 watchdog_usec: int = 1_000_000):
    """(broker, tree, uuid): a provisioned broker and the whole tree in mock mode, ready."""
    from tests.support.broker import MosquittoBroker
    from tests.support.tree import Tree

    dev = str(uuid.uuid4())
    broker = MosquittoBroker([dev], work / "broker").start()
    tree = Tree(work / "tree", broker, dev, env=env or {}, watchdog_usec=watchdog_usec)
    if helper_env and tree.helper is not None:
        tree.helper.env.update(helper_env)
    tree.start()
    return broker, tree, dev


def client(broker, username: str, password: str, client_id: str | None = None) -> mqtt.Client:
    """A threaded paho client with TCP_NODELAY, connected (waits for CONNACK): TLS pinned to the
    broker's fleet CA with the project's rules (infoscreen.mqttclient) when the broker has TLS,
    and a device account under its own client id (the broker binds the two)."""
    if client_id is None:
        client_id = next((u for u in broker.devices if broker.device_user(u) == username), None)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"bench-{uuid.uuid4().hex[:8]}",
                    protocol=MQTTProtocolVersion.MQTTv5)
    c.username_pw_set(username, password)
    if broker.ca_file:
        c.tls_set_context(tls_context(broker.ca_file))
    c.on_socket_open = lambda cl, ud, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.max_inflight_messages_set(200)
    ok = threading.Event()
    c.on_connect = lambda cl, ud, fl, rc, pr: ok.set()
    c.connect(broker.host, broker.port, 30)
    c.loop_start()
    if not ok.wait(10):
        raise RuntimeError("bench client: no CONNACK")
    return c


def subscribe(c: mqtt.Client, topic: str) -> None:
    done = threading.Event()
    prev = c.on_subscribe
    c.on_subscribe = lambda *a: done.set()
    c.subscribe(topic, qos=1)
    if not done.wait(10):
        raise RuntimeError(f"no SUBACK for {topic}")
    c.on_subscribe = prev
