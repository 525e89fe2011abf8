"""The command lifecycle in this process, on a hand clock: the real Lifecycle, Store (SQLite in a
temporary dir) and Outbox; a loop whose timers run on a FakeClock; the test plays the supervisor
(it answers ExecRequest/ExecQuery by calling on_exec_result) and the broker (every ack published
is recorded and acknowledged).

    dev = Device(tmp_path, REBOOT_GRACE_S="10")
    cid = dev.command("reboot_host")       # on_command; then every publish is PUBACKed
    dev.result(cid, ok=True)               # an ExecResult
    dev.advance(4.0)                       # the clock moves; the timers that fell due run, in order
    dev.restart(new_boot=True)             # a new process on the same state dir (startup())
    dev.statuses(cid, topic)               # the acks the broker got, in order
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infoscreen.config import load_config
from infoscreen.ipc import messages
from infoscreen.loop import Timer
from infoscreen.wire import topics
from infoscreen.wire.schema import format_utc
from infoscreen.workers.mqtt.clock import FakeClock
from infoscreen.workers.mqtt.lifecycle import Lifecycle, Transition
from infoscreen.workers.mqtt.outbox import Outbox
from infoscreen.workers.mqtt.store import Store

UUID = "9b8d1856-ff34-4864-a726-12de072d0f77"
ACK_TOPICS = topics.ack_topics(UUID)


class ClockLoop:
    """The loop's timer interface on a FakeClock: advance() runs what fell due, in time order."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.clock.mono()

    def call_at(self, when: float, callback) -> Timer:
        t = Timer(when, callback)
        heapq.heappush(self._timers, (when, next(self._seq), t))
        return t

    def call_later(self, delay: float, callback) -> Timer:
        return self.call_at(self.time() + delay, callback)

    def pending(self) -> list[Timer]:
        return [t for _, _, t in self._timers if not t.cancelled]

    def advance(self, seconds: float) -> None:
        end = self.clock.mono() + seconds
        while self._timers and self._timers[0][0] <= end:
            when, _, t = heapq.heappop(self._timers)
            if t.cancelled:
                continue
            if when > self.clock.mono():
                self.clock.advance(when - self.clock.mono())
            t.cancelled = True
            t.callback()
        if end > self.clock.mono():
            self.clock.advance(end - self.clock.mono())


_order = itertools.count()  # one sequence over everything the worker sends or publishes


@dataclass
class Sent:
    process: int  # which start of the worker sent it
    transition: int  # the index of the transition being applied when it was sent
    msg: messages.Msg
    seq: int = dataclasses.field(default_factory=lambda: next(_order))


@dataclass
class Published:
    transition: int
    topic: str
    ack: dict[str, Any]
    seq: int = dataclasses.field(default_factory=lambda: next(_order))


class Device:
    def __init__(self, tmp: Path, clock: FakeClock | None = None, **env: str) -> None:
        self.dir = Path(tmp)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.clock = clock or FakeClock()
        self.boot_file = self.dir / "boot_id"
        self.boot_file.write_text(str(uuidlib.uuid4()) + "\n")
        base = {
            "INFOSCREEN_ENV": "test", "CLIENT_UUID": UUID, "MQTT_BROKER": "127.0.0.1",
            "INFOSCREEN_STATE_DIR": str(self.dir / "state"), "INFOSCREEN_RUNTIME_DIR": str(self.dir / "run"),
            "INFOSCREEN_BOOT_ID_FILE": str(self.boot_file),
            "HELPER_COMMAND_KEY_FILE": str(self.dir / "command.key"),  # absent: an unkeyed device
            "HELPER_TIMEOUT_S": "1", "REBOOT_GRACE_S": "60",
        }
        base.update(env)
        self.cfg = load_config(base)
        self.sent: list[Sent] = []
        self.published: list[Published] = []
        self.transitions: list[Transition] = []
        self.info: list[str] = []
        self.processes = 0
        self.store: Store | None = None
        self.start()

    # -- processes ------------------------------------------------------------------------------
    @property
    def boot_id(self) -> str:
        return self.boot_file.read_text().strip()

    def start(self) -> None:
        self.processes += 1
        self.loop = ClockLoop(self.clock)
        self.store = Store(self.cfg.state_dir)
        self.outbox = Outbox(self.store, self.loop, self.clock, self.boot_id)
        self._mids = itertools.count(1)
        self.outbox.publish = self._publish
        self.lc = Lifecycle(self.cfg, self.loop, self.store, self.outbox, self.clock, self.boot_id, self._send,
                            self.info.append, on_transition=self.transitions.append)
        self.outbox.on_connect()  # before startup(): its acks go out as they are committed
        self.lc.startup()
        self.settle()

    def stop(self) -> None:
        """The process dies (its timers with it); what was committed stays."""
        if self.store is not None:
            self.store.close()
            self.store = None

    def restart(self, new_boot: bool = False) -> None:
        self.stop()
        if new_boot:
            self.new_boot()
        self.start()

    def new_boot(self) -> str:
        bid = str(uuidlib.uuid4())
        self.boot_file.write_text(bid + "\n")
        return bid

    # -- what the worker does to the outside -------------------------------------------------------
    def _send(self, msg: messages.Msg) -> bool:
        self.sent.append(Sent(self.processes, len(self.transitions), msg))
        return True

    def _publish(self, topic: str, payload: bytes) -> int:
        self.published.append(Published(len(self.transitions), topic, json.loads(payload)))
        return next(self._mids)

    def settle(self) -> None:
        """The broker acknowledges every publish; the outbox forgets them (its next loop pass)."""
        for mid in list(self.outbox.inflight):
            self.outbox.on_puback(mid, 0)
        self.loop.advance(0.0)

    # -- what the test does -----------------------------------------------------------------------
    def payload(self, action: str = "reboot_host", command_id: str | None = None, expires_in: float = 3600.0,
                **extra: Any) -> bytes:
        now = self.clock.wall()
        body = {"schema_version": "1.0", "command_id": command_id or str(uuidlib.uuid4()), "client_uuid": UUID,
                "action": action, "issued_at": format_utc(now), "expires_at": format_utc(now + expires_in)}
        body.update(extra)
        return json.dumps({k: v for k, v in body.items() if v is not None}).encode()

    def command(self, action: str = "reboot_host", command_id: str | None = None, *, topic: str = "commands",
                signature: str | None = None, **kw: Any) -> str:
        cid = command_id or str(uuidlib.uuid4())
        self.lc.on_command(self.payload(action, cid, **kw), f"infoscreen/{UUID}/{topic}", signature)
        self.settle()
        return cid

    def result(self, cid: str, ok: bool = True, mock: bool = False, code: str | None = None,
               message: str | None = None, known: bool = True) -> None:
        self.lc.on_exec_result(messages.ExecResult(command_id=cid, action=None, known=known, ok=ok, mock=mock,
                                                   error_code=code, error_message=message))
        self.settle()

    def advance(self, seconds: float) -> None:
        self.loop.advance(seconds)
        self.settle()

    # -- what the test looks at -------------------------------------------------------------------
    def requests(self, cid: str) -> list[messages.ExecRequest]:
        return [s.msg for s in self.sent if isinstance(s.msg, messages.ExecRequest) and s.msg.command_id == cid]

    def queries(self, cid: str) -> list[messages.ExecQuery]:
        return [s.msg for s in self.sent if isinstance(s.msg, messages.ExecQuery) and s.msg.command_id == cid]

    def acks(self, cid: str, topic: str = ACK_TOPICS[0]) -> list[dict[str, Any]]:
        return [p.ack for p in self.published if p.topic == topic and p.ack["command_id"] == cid]

    def statuses(self, cid: str, topic: str = ACK_TOPICS[0]) -> list[str]:
        return [a["status"] for a in self.acks(cid, topic)]

    def command_timers(self) -> list[Timer]:
        """The lifecycle's timers still pending in the loop (the outbox has its own)."""
        return [t for t in self.loop.pending() if getattr(t.callback, "__qualname__", "").startswith("Lifecycle.")]

    def of(self, cid: str) -> list[Transition]:
        return [t for t in self.transitions if t.command_id == cid]

    def last(self, cid: str) -> Transition:
        return self.of(cid)[-1]
