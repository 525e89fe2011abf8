"""The supervisor's loop: workers' policies, message routing, systemd notifications.

Routing and authorisation are one closed table (message type -> senders allowed ->
handler), in the manner of OpenSSH's monitor: a message from a sender its row does
not name is dropped and logged. A sender is the worker whose spawned pid the kernel
reports for the connection (ipc/channel.py), never a name the peer gives; a
Hello/Heartbeat must also carry that pid.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from ..config import ClientConfig
from ..ipc import messages
from ..ipc.channel import SupervisorChannel
from ..logsetup import SinkHandler
from ..loop import Loop, Timer
from .executor import Executor
from .notify import Notifier
from .policy import Params, ProcessControl, Transition, WorkerPolicy
from .states import Event, State

log = logging.getLogger(__name__)

WORKERS = ("mqtt", "health")
EXIT_OK = 0
EXIT_ESCALATED = 1


class Supervisor:
    def __init__(
        self,
        cfg: ClientConfig,
        loop: Loop,
        channel: SupervisorChannel,
        notifier: Notifier,
        control_factory: Callable[[Callable[[str, int, str], None]], ProcessControl],
        params: Params,
        workers: tuple[str, ...] = WORKERS,
    ) -> None:
        self.cfg = cfg
        self.loop = loop
        self.channel = channel
        self.notifier = notifier
        self.control = control_factory(self._on_exit)
        self.policies = {w: WorkerPolicy(w, params, self.control, self._on_transition) for w in workers}
        self._timers: dict[str, Timer] = {}
        self.ready_sent = False
        self.exit_code = EXIT_OK
        self.stopping = False
        self.broker: messages.BrokerStatus | None = None
        self.executor = Executor(loop, cfg.helper_socket, cfg.helper_timeout_s, self._reply_exec)
        any_worker = frozenset(workers)
        self.routes: dict[type, tuple[frozenset[str], Callable[[str, messages.Msg], None]]] = {
            messages.Hello: (any_worker, self._on_hello),
            messages.Heartbeat: (any_worker, self._on_heartbeat),
            messages.LogRecord: (any_worker, self._on_log),
            messages.HealthReport: (frozenset({"health"}), self._forward_to_mqtt),
            messages.BrokerStatus: (frozenset({"mqtt"}), self._on_broker),
            messages.ExecRequest: (frozenset({"mqtt"}), lambda s, m: self.executor.request(m)),
            messages.ExecQuery: (frozenset({"mqtt"}), lambda s, m: self.executor.query(m)),
        }
        channel.worker_of_pid = self._worker_of_pid
        loop.add_reader(channel.zap, channel.on_zap)
        loop.add_reader(channel.sock, self._on_ipc)
        logging.getLogger().addHandler(SinkHandler(self._own_log))

    # -- start and stop ------------------------------------------------------------
    def start(self) -> None:
        self._update_status()
        for name in self.policies:
            self._event(name, Event.START)
        if self.notifier.watchdog_interval_s:
            self._pet_watchdog()

    def request_stop(self, why: str = "SIGTERM") -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping (%s)", why)
        self.notifier.stopping()
        for name in self.policies:
            self._event(name, Event.STOP)
        self._check_all_stopped()

    def _check_all_stopped(self) -> None:
        if self.stopping and all(p.state in (State.STOPPED, State.FATAL) for p in self.policies.values()):
            self.loop.stop()

    # -- events into the policies ---------------------------------------------------
    def _event(self, name: str, event: Event) -> None:
        policy = self.policies[name]
        policy.handle(event, self.loop.time())
        self._rearm(policy)

    def _rearm(self, policy: WorkerPolicy) -> None:
        old = self._timers.pop(policy.name, None)
        if old is not None:
            old.cancel()
        if policy.deadline is not None:
            self._timers[policy.name] = self.loop.call_at(
                policy.deadline, lambda n=policy.name: self._event(n, Event.DEADLINE)
            )

    def _on_exit(self, worker: str, pid: int, what: str) -> None:
        policy = self.policies[worker]
        if pid != policy.pid:
            return
        self.channel.forget(worker)
        level = logging.INFO if policy.shutting_down else logging.WARNING
        log.log(level, "worker %s (pid %d) %s", worker, pid, what)
        self._event(worker, Event.EXITED)
        self._check_all_stopped()

    def _on_transition(self, t: Transition) -> None:
        log.info("worker %s: %s -> %s (%s)", t.worker, t.old.value, t.new.value, t.reason)
        if t.new is State.FATAL and not self.stopping:
            self.exit_code = EXIT_ESCALATED
            why = f"worker {t.worker} is crash-looping: {t.reason}; giving up so systemd can act"
            log.error("%s", why)
            self.notifier.status(f"FATAL: {why}")
            self.request_stop("escalation")
            return
        self._update_status()
        self.channel.send(
            "mqtt",
            messages.TreeStatus(
                workers={n: p.state.value for n, p in self.policies.items()},
                restarts={n: p.restart_count for n, p in self.policies.items()},
            ),
        )

    # -- IPC ---------------------------------------------------------------------------
    def _worker_of_pid(self, pid: int) -> str | None:
        """The worker whose current process has this pid (the policy's pid is set when it is
        spawned, before the child can connect, and cleared when it is reaped)."""
        for name, policy in self.policies.items():
            if policy.pid == pid:
                return name
        return None

    def _on_ipc(self) -> None:
        for sender, msg in self.channel.drain():
            route = self.routes.get(type(msg))
            if route is None or sender not in route[0]:
                self.channel.drops.warn(self.policies[sender].pid, "dropped %s from %s: not allowed for that sender",
                                        type(msg).__name__, sender)
                continue
            route[1](sender, msg)

    def _from_current(self, sender: str, msg: messages.Hello | messages.Heartbeat) -> bool:
        policy = self.policies[sender]
        if msg.worker != sender or msg.pid != policy.pid:
            self.channel.drops.warn(policy.pid, "dropped %s from %s claiming %s pid %d", type(msg).__name__, sender,
                                    msg.worker[:32], msg.pid)
            return False
        return True

    def _on_hello(self, sender: str, msg: messages.Hello) -> None:
        if not self._from_current(sender, msg):
            return
        self._event(sender, Event.HELLO)
        if not self.ready_sent and all(p.state is State.RUNNING for p in self.policies.values()):
            self.ready_sent = True
            self.notifier.ready()
            log.info("all workers ready")

    def _on_heartbeat(self, sender: str, msg: messages.Heartbeat) -> None:
        if self._from_current(sender, msg):
            self._event(sender, Event.HEARTBEAT)

    def _on_log(self, sender: str, msg: messages.LogRecord) -> None:
        if sender != "mqtt":
            self.channel.send("mqtt", msg)

    def _forward_to_mqtt(self, sender: str, msg: messages.Msg) -> None:
        self.channel.send("mqtt", msg)

    def _on_broker(self, sender: str, msg: messages.BrokerStatus) -> None:
        self.broker = msg
        self._update_status()

    def _reply_exec(self, result: messages.ExecResult) -> None:
        self.channel.send("mqtt", result)

    def _own_log(self, level: str, message: str, created: float) -> None:
        self.channel.send("mqtt", messages.LogRecord(source="supervisor", level=level, message=message, created=created))

    # -- systemd -------------------------------------------------------------------------
    def _pet_watchdog(self) -> None:
        # Petted only while every worker is live or within its restart budget: once one
        # is FATAL the supervisor is on its way out and systemd must take over.
        if all(p.within_budget for p in self.policies.values()):
            self.notifier.watchdog()
        interval = self.notifier.watchdog_interval_s
        assert interval is not None
        self.loop.call_later(interval, self._pet_watchdog)

    def status_line(self) -> str:
        parts = [f"{n}={p.state.value}(restarts={p.restart_count})" for n, p in self.policies.items()]
        b = self.broker
        if b is None:
            parts.append("broker=unknown")
        else:
            parts.append(f"broker={'connected' if b.broker_reachable else 'unreachable'}(reconnects={b.reconnect_count})")
        return " ".join(parts)

    def _update_status(self) -> None:
        if self.exit_code == EXIT_OK:
            self.notifier.status(("stopping: " if self.stopping else "") + self.status_line())

    def run(self) -> int:
        self.start()
        self.loop.run_forever()
        log.info("exiting with status %d (pid %d)", self.exit_code, os.getpid())
        return self.exit_code
