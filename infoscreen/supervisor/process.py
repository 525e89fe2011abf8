"""The supervisor's OS boundary: start worker processes, signal them, learn of their exit.

Exit is learnt from a pidfd per child (readable the moment the child exits), polled by
the main loop next to the sockets: no SIGCHLD handler and no polling tick, so a killed
worker is seen within the loop's next wake-up (supervisord's loop needs about 1 s here).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping

from ..loop import Loop

log = logging.getLogger(__name__)

# Never handed to a worker: only the supervisor may talk to systemd (NotifyAccess=main),
# and socket-activation variables belong to whoever systemd started.
SCRUBBED_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")

WORKER_MODULES = {"mqtt": "infoscreen.workers.mqtt", "health": "infoscreen.workers.health"}


def worker_environment(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in SCRUBBED_VARS}
    env.update(extra)
    env["INFOSCREEN_SUPERVISOR_PID"] = str(os.getpid())
    return env


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


class OsProcesses:
    """Real processes. ``on_exit(worker, pid, description)`` is called from the loop."""

    def __init__(
        self,
        loop: Loop,
        env: Mapping[str, str],
        on_exit: Callable[[str, int, str], None],
        modules: Mapping[str, str] = WORKER_MODULES,
    ) -> None:
        self.loop = loop
        self.env = dict(env)
        self.on_exit = on_exit
        self.modules = dict(modules)
        self.pidfds: dict[int, int] = {}

    def spawn(self, worker: str) -> int:
        argv = [sys.executable, "-m", self.modules[worker]]
        # posix_spawn (vfork-like in glibc): the cheapest way to start a process. Our fds are
        # non-inheritable (PEP 446), so the child gets stdin/stdout/stderr only.
        pid = os.posix_spawn(sys.executable, argv, self.env)
        pidfd = os.pidfd_open(pid)
        self.pidfds[pid] = pidfd
        self.loop.add_reader(pidfd, lambda: self._reap(worker, pid))
        return pid

    def _reap(self, worker: str, pid: int) -> None:
        pidfd = self.pidfds.pop(pid, None)
        if pidfd is None:
            return
        self.loop.remove_reader(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(pid, 0)  # readable pidfd: it has exited, this does not block
            what = describe_status(status)
        except ChildProcessError:
            what = "exited (status unknown)"
        self.on_exit(worker, pid, what)

    def kill(self, pid: int, sig: int) -> None:
        pidfd = self.pidfds.get(pid)
        try:
            if pidfd is not None:
                # Through the pidfd: never a recycled pid, even if the child was already reaped.
                signal.pidfd_send_signal(pidfd, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def alive(self) -> list[int]:
        return list(self.pidfds)
