"""What every worker process shares: config, the supervisor link, liveness, parent death.

A worker is one process running one :class:`~infoscreen.loop.Loop`. It says
``Hello`` once its own initialisation is done, and sends ``Heartbeat`` from a timer of
that same loop: if the loop is stuck, the heartbeats stop and the supervisor replaces
the worker. It dies with its supervisor: ``PR_SET_PDEATHSIG`` delivers SIGTERM when
the parent goes, and each heartbeat also checks the parent pid (a belt for the case
where the supervisor died before the prctl took effect).

A worker makes itself non-dumpable first thing (exec made it dumpable again): a dumpable
process's environment (the MQTT worker's holds the broker password) and memory are open to
every process of the same uid.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

import zmq

from .. import logsetup
from ..config import ClientConfig, ConfigError, load_config
from ..ipc import messages
from ..ipc.channel import WorkerChannel
from ..loop import Loop
from ..supervisor.process import make_non_dumpable

PR_SET_PDEATHSIG = 1
SUPERVISOR_PID_VAR = "INFOSCREEN_SUPERVISOR_PID"
EXIT_CONFIG = 2
EXIT_ORPHANED = 3


def die_with_parent() -> int | None:
    """Ask the kernel for SIGTERM when the supervisor exits; returns the expected parent."""
    expected = os.environ.get(SUPERVISOR_PID_VAR)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if expected is None:
        return None  # started by hand (development): no supervisor to follow
    parent = int(expected)
    if os.getppid() != parent:  # the supervisor died before the prctl
        sys.exit(EXIT_ORPHANED)
    return parent


class Worker:
    """Base of the two workers; subclasses implement :meth:`setup` and :meth:`on_message`."""

    name = "worker"

    def __init__(self) -> None:
        make_non_dumpable()
        self.parent_pid = die_with_parent()
        self.log = logsetup.setup(f"infoscreen-{self.name}")
        try:
            self.cfg: ClientConfig = load_config()
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            sys.exit(EXIT_CONFIG)
        self.loop = Loop()
        self.ctx = zmq.Context.instance()
        self.channel = WorkerChannel(self.ctx, self.cfg.runtime_dir, self.name, supervisor_pid=self.parent_pid)
        self.loop.add_reader(self.channel.sock, self._on_ipc)
        self.loop.add_signal_handler(signal.SIGTERM, self.stop)
        self.loop.add_signal_handler(signal.SIGINT, self.stop)
        self._seq = 0
        self._install_log_sink()

    # -- to override -------------------------------------------------------------
    def setup(self) -> None:
        """Initialise; called before Hello."""

    def on_message(self, msg: messages.Msg) -> None:
        """A message routed to this worker by the supervisor."""

    def teardown(self) -> None:
        """Release what setup took; called once the loop has stopped."""

    def log_sink(self, level: str, message: str, created: float) -> None:
        """Where this worker's warnings and errors go besides stderr: the supervisor."""
        self.channel.send(messages.LogRecord(source=self.name, level=level, message=message, created=created))

    # -- the frame -------------------------------------------------------------------
    def _install_log_sink(self) -> None:
        logging.getLogger().addHandler(logsetup.SinkHandler(self.log_sink))

    def _on_ipc(self) -> None:
        for msg in self.channel.drain():
            self.on_message(msg)

    def _heartbeat(self) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            self.log.error("supervisor %d is gone; exiting", self.parent_pid)
            self.stop()
            return
        self._seq += 1
        self.channel.send(messages.Heartbeat(worker=self.name, pid=os.getpid(), seq=self._seq))
        self.loop.call_later(self.cfg.worker_heartbeat_s, self._heartbeat)

    def stop(self) -> None:
        self.loop.stop()

    def run(self) -> int:
        self.setup()
        self.channel.send(messages.Hello(worker=self.name, pid=os.getpid()))
        self._heartbeat()
        try:
            self.loop.run_forever()
        finally:
            self.teardown()
            self.channel.close()
        return 0
