"""Fixtures of the MQTT worker suite: the worker process alone, against the real broker, with
the test playing the supervisor on the worker's real IPC endpoint (a ROUTER socket).

    w = mqtt_worker()                          # started; returns once the worker said Hello
    sup = w.sup                                # FakeSupervisor: every message the worker sent
    srv = server(w)                            # MqttProbe with the server account, subscribed to acks
    cid = srv.command(w, "reboot_host")        # publishes a command; returns its id
    srv.wait_ack(w, cid, "completed")
    w.kill(); w.start()                        # SIGKILL and restart on the same state dir

Nothing sleeps: every wait is on a socket poll or a condition, with a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import pytest
import zmq

from infoscreen.ipc import messages
from infoscreen.ipc.channel import SupervisorChannel, prepare_runtime_dir
from infoscreen.wire import signing
from tests.support.broker import MosquittoBroker
from tests.support.mqtt import MqttProbe
from tests.support.waiting import stop_process

REPO = Path(__file__).resolve().parents[2]


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_plus(seconds: float) -> str:
    return iso(datetime.now(timezone.utc) + timedelta(seconds=seconds))


class FakeSupervisor:
    """The supervisor's end of the IPC: records what the worker sends, answers exec requests.

    A thread owns the ROUTER socket (ZeroMQ sockets stay in one thread); the test thread sends
    through an inproc PAIR that wakes it, and waits on a condition for what arrived."""

    def __init__(self, runtime_dir: Path) -> None:
        prepare_runtime_dir(runtime_dir)
        self.ctx = zmq.Context()
        self.ch = SupervisorChannel(self.ctx, runtime_dir)
        # Admitted by the kernel-reported pid, like the real supervisor: WorkerProc.start sets it.
        self.worker_pid: int | None = None
        self.ch.worker_of_pid = lambda pid: "mqtt" if pid == self.worker_pid else None
        self.msgs: list[tuple[float, messages.Msg]] = []
        self.cond = threading.Condition()
        # answer(ExecRequest) -> ExecResult | None (None: leave it unanswered)
        self.on_exec: Callable[[messages.ExecRequest], messages.ExecResult | None] = (
            lambda r: messages.ExecResult(command_id=r.command_id, action=r.action, known=True, ok=True, mock=True))
        self.on_query: Callable[[messages.ExecQuery], messages.ExecResult | None] = (
            lambda q: messages.ExecResult(command_id=q.command_id, action=None, known=False))
        addr = f"inproc://fake-sup-{id(self):x}"
        self._wake_rx = self.ctx.socket(zmq.PAIR)
        self._wake_rx.bind(addr)
        self._wake_tx = self.ctx.socket(zmq.PAIR)
        self._wake_tx.connect(addr)
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="fake-supervisor")
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.ch.sock, zmq.POLLIN)
        poller.register(self.ch.zap, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._wake_rx in events:
                while True:
                    try:
                        frame = self._wake_rx.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if frame == b"":
                        self.ch.close()
                        self._wake_rx.close(linger=0)
                        return
                    self.ch.send("mqtt", messages.decode(frame))
            if self.ch.zap in events:
                self.ch.on_zap()
            if self.ch.sock in events:
                self._drain()

    def _drain(self) -> None:
        while True:
            try:
                got = self.ch.recv()
            except zmq.Again:
                return
            if got is None:
                continue
            _, msg = got
            reply = None
            try:
                if isinstance(msg, messages.ExecRequest):
                    reply = self.on_exec(msg)
                elif isinstance(msg, messages.ExecQuery):
                    reply = self.on_query(msg)
            except Exception:  # noqa: BLE001 - a test callback bug must not kill the thread
                reply = None
            with self.cond:
                self.msgs.append((time.monotonic(), msg))
                self.cond.notify_all()
            if reply is not None:
                self.ch.send("mqtt", reply)

    def send(self, msg: messages.Msg) -> None:
        self._wake_tx.send(messages.encode(msg))

    def wait_for(self, predicate: Callable[[messages.Msg], bool], timeout: float = 10.0, start: int = 0,
                 what: str = "message") -> messages.Msg:
        def find():
            for _, m in self.msgs[start:]:
                if predicate(m):
                    return m
            return None

        with self.cond:
            got = self.cond.wait_for(find, timeout)
            if got is None:
                raise TimeoutError(f"no {what} from the worker within {timeout} s; got "
                                   f"{[type(m).__name__ for _, m in self.msgs[-20:]]}")
            return got

    def count(self) -> int:
        with self.cond:
            return len(self.msgs)

    def of(self, kind: type) -> list[Any]:
        with self.cond:
            return [m for _, m in self.msgs if isinstance(m, kind)]

    def exec_requests(self, command_id: str | None = None) -> list[messages.ExecRequest]:
        return [m for m in self.of(messages.ExecRequest) if command_id is None or m.command_id == command_id]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._wake_tx.send(b"")
            self._thread.join(5)
            self._wake_tx.close(linger=0)
            self.ctx.term()


class WorkerProc:
    def __init__(self, env: dict[str, str], workdir: Path, runtime: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.runtime = runtime
        self.sup = FakeSupervisor(runtime)
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "mqtt-worker.log"
        self.starts = 0
        self.uuid = env["CLIENT_UUID"]

    @property
    def state_dir(self) -> Path:
        return Path(self.env["INFOSCREEN_STATE_DIR"])

    @property
    def boot_id_file(self) -> Path:
        return Path(self.env["INFOSCREEN_BOOT_ID_FILE"])

    def new_boot(self) -> str:
        bid = str(uuidlib.uuid4())
        self.boot_id_file.write_text(bid + "\n")
        return bid

    def start(self, wait_connected: bool = True, timeout: float = 10.0) -> "WorkerProc":
        mark = self.sup.count()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "infoscreen.workers.mqtt"], env=self.env, stdout=log, stderr=log,
                stdin=subprocess.DEVNULL, cwd=str(REPO),
                preexec_fn=lambda: __import__("ctypes").CDLL(None).prctl(1, signal.SIGTERM),
            )
        self.starts += 1
        pid = self.proc.pid
        self.sup.worker_pid = pid
        try:
            self.sup.wait_for(lambda m: isinstance(m, messages.Hello) and m.pid == pid, timeout, mark, "Hello")
            if wait_connected:
                self.wait_broker(True, timeout, mark)
        except TimeoutError:
            raise TimeoutError(f"worker not up; log:\n{self.log_text()[-3000:]}") from None
        return self

    def wait_broker(self, reachable: bool, timeout: float = 10.0, start: int | None = None) -> messages.BrokerStatus:
        return self.sup.wait_for(lambda m: isinstance(m, messages.BrokerStatus) and m.broker_reachable == reachable,
                                 timeout, self.sup.count() if start is None else start, f"BrokerStatus {reachable}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 5.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        stop_process(self.proc)

    def cleanup(self) -> None:
        self.stop()
        self.sup.close()
        shutil.rmtree(self.runtime, ignore_errors=True)


class Server(MqttProbe):
    """The server side: the server account, subscribed to the device's ack topics."""

    def watch(self, uuid: str) -> "Server":
        self.subscribe(f"infoscreen/{uuid}/commands/ack")
        self.subscribe(f"infoscreen/{uuid}/command/ack")
        return self

    def command(self, uuid: str, action: str = "reboot_host", *, expires_in: float = 60.0, topic: str = "commands",
                retain: bool = False, command_id: str | None = None, key: bytes | None = None,
                signature: str | None = None, **extra: Any) -> str:
        """Publish a command; signed with `key` (or with the given `signature` property)."""
        cid = command_id or str(uuidlib.uuid4())
        body = {"schema_version": "1.0", "command_id": cid, "client_uuid": uuid, "action": action,
                "issued_at": now_plus(0), "expires_at": now_plus(expires_in)}
        body.update(extra)
        body = {k: v for k, v in body.items() if v is not None}
        payload = json.dumps(body).encode()
        self.last_payload = payload
        if key is not None:
            signature = signing.sign(key, payload)
        props = [(signing.SIGNATURE_PROPERTY, signature)] if signature is not None else None
        rc = self.publish(f"infoscreen/{uuid}/{topic}", payload, retain=retain, user_properties=props)
        assert rc in (0, 16), rc
        return cid

    def raw(self, uuid: str, payload: bytes, topic: str = "commands") -> None:
        rc = self.publish(f"infoscreen/{uuid}/{topic}", payload)
        assert rc in (0, 16), rc

    def acks(self, uuid: str, cid: str, topic: str = "commands/ack") -> list[dict]:
        return [m.json() for m in self.messages(f"infoscreen/{uuid}/{topic}") if m.json().get("command_id") == cid]

    def wait_ack(self, uuid: str, cid: str, status: str, *, topic: str = "commands/ack", timeout: float = 10.0,
                 code: str | None = None) -> dict:
        def match(m) -> bool:
            try:
                a = m.json()
            except ValueError:
                return False
            return a.get("command_id") == cid and a.get("status") == status and (code is None or a.get("error_code") == code)
        return self.wait_for(f"infoscreen/{uuid}/{topic}", match, timeout).json()

    def statuses(self, uuid: str, cid: str, topic: str = "commands/ack") -> list[str]:
        return [a["status"] for a in self.acks(uuid, cid, topic)]


@pytest.fixture
def mqtt_broker(broker_factory, device_uuid) -> MosquittoBroker:
    return broker_factory([device_uuid])


@pytest.fixture
def mqtt_worker(mqtt_broker, device_uuid, tmp_path) -> Callable[..., WorkerProc]:
    """`mqtt_worker(start=True, **env) -> WorkerProc` for `device_uuid` against `mqtt_broker`."""
    made: list[WorkerProc] = []

    def make(start: bool = True, broker: MosquittoBroker | None = None, uuid: str | None = None,
             **env: str) -> WorkerProc:
        b = broker or mqtt_broker
        u = uuid or device_uuid
        workdir = tmp_path / f"w{len(made)}"
        workdir.mkdir()
        runtime = Path(tempfile.mkdtemp(prefix="imq-", dir="/tmp"))
        boot = workdir / "boot_id"
        boot.write_text(str(uuidlib.uuid4()) + "\n")
        e = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "INFOSCREEN_", "HELPER_", "NOTIFY_"))}
        e.update(b.device_env(u))
        e.update({
            "CLIENT_UUID": u,
            "MQTT_BROKER": b.host,
            "MQTT_PORT": str(b.port),
            "INFOSCREEN_ENV": "test",
            "INFOSCREEN_STATE_DIR": str(workdir / "state"),
            "INFOSCREEN_RUNTIME_DIR": str(runtime),
            "INFOSCREEN_BOOT_ID_FILE": str(boot),
            "INFOSCREEN_CLOCK_TRUST": "always",
            "HEARTBEAT_INTERVAL_S": "1",
            "HEALTH_INTERVAL_S": "1",
            "WORKER_HEARTBEAT_S": "0.2",
            "WORKER_HANG_TIMEOUT_S": "3",
            "HELPER_TIMEOUT_S": "1",
            "REBOOT_GRACE_S": "3",
            "PYTHONUNBUFFERED": "1",
        })
        e.update(env)
        w = WorkerProc(e, workdir, runtime)
        made.append(w)
        return w.start() if start else w

    yield make
    for w in made:
        w.cleanup()


@pytest.fixture
def server(mqtt_broker, mqtt_probe_factory) -> Callable[..., Server]:
    made: list[Server] = []

    def make(w: WorkerProc | None = None, broker: MosquittoBroker | None = None, **kw) -> Server:
        b = broker or mqtt_broker
        s = Server(b.host, b.port, username=b.server_user, password=b.server_password, **kw)
        made.append(s)
        s.connect()
        if w is not None:
            s.watch(w.uuid)
        return s

    yield make
    for s in made:
        s.close()
