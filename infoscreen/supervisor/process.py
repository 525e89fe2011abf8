"""The supervisor's OS boundary: start worker processes, signal them, learn of their exit.

Exit is learnt from a pidfd per child (readable the moment the child exits), polled by
the main loop next to the sockets: no SIGCHLD handler and no polling tick, so a killed
worker is seen within the loop's next wake-up (supervisord's loop needs about 1 s here).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping

from ..loop import Loop

log = logging.getLogger(__name__)

# What a child gets is built, never inherited: only the variables named here, from the
# supervisor's configuration (ClientConfig.to_environ), plus the few of its own environment that
# any Python process needs. So NOTIFY_SOCKET, WATCHDOG_*, LISTEN_* (systemd's, for the supervisor
# alone), whatever the unit or the env file adds, and any secret a worker has no use for stay out.
PROCESS_VARS = frozenset({
    "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ",
    "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONPATH",
    # stderr's identity when it is the journal (logsetup.py: each line then carries its priority).
    "JOURNAL_STREAM",
})

_BOTH = frozenset({
    "INFOSCREEN_ENV", "INFOSCREEN_STATE_DIR", "INFOSCREEN_RUNTIME_DIR",
    "WORKER_HEARTBEAT_S", "WORKER_HANG_TIMEOUT_S",
})

WORKER_VARS: dict[str, frozenset[str]] = {
    # The network side: the broker account, identity, command execution and its timing.
    "mqtt": _BOTH | {
        "CLIENT_UUID", "MQTT_BROKER", "MQTT_PORT", "MQTT_USER", "MQTT_PASSWORD_BROKER", "MQTT_TLS",
        "MQTT_CA_FILE", "MQTT_CERT_FILE", "MQTT_KEY_FILE", "COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE",
        "HEARTBEAT_INTERVAL_S", "HEALTH_INTERVAL_S", "INFOSCREEN_CLOCK_TRUST", "INFOSCREEN_BOOT_ID_FILE",
        "REBOOT_GRACE_S", "HELPER_TIMEOUT_S", "HELPER_COMMAND_KEY_FILE", "MQTT_ALLOW_PLAINTEXT",
    },
    # The probes: no broker, no account, no identity.
    "health": _BOTH | {
        "HEALTH_INTERVAL_S", "DISPLAY_PROCESS_NAME", "DISPLAY_PIDFILE", "DISPLAY_PROCESS_USER",
        "INFOSCREEN_BOOT_ID_FILE",
    },
}

# Test-only switches, passed on only outside production (the worker ignores them there too).
TEST_VARS: dict[str, frozenset[str]] = {"mqtt": frozenset({"INFOSCREEN_TEST_CRASHPOINT"}), "health": frozenset()}

WORKER_MODULES = {"mqtt": "infoscreen.workers.mqtt", "health": "infoscreen.workers.health"}


def worker_environment(worker: str, base: Mapping[str, str], config: Mapping[str, str]) -> dict[str, str]:
    """The whole environment of one worker: its allow-listed configuration variables, the
    allow-listed process basics of ``base``, and the supervisor's pid (for parent-death checks)."""
    allowed = WORKER_VARS[worker]
    env = {k: v for k, v in base.items() if k in PROCESS_VARS}
    if config.get("INFOSCREEN_ENV") != "production":
        env.update({k: v for k, v in base.items() if k in TEST_VARS[worker]})
    env.update({k: v for k, v in config.items() if k in allowed})
    env["INFOSCREEN_SUPERVISOR_PID"] = str(os.getpid())
    return env


PR_SET_DUMPABLE = 4


def make_non_dumpable() -> bool:
    """prctl(PR_SET_DUMPABLE, 0): /proc/<pid>/environ, mem and ptrace are then closed to processes of
    the same uid (only root's CAP_SYS_PTRACE still opens them), and no core dump is written.
    exec resets it, so every process of the tree calls this itself. True if the kernel took it."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


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
        envs: Mapping[str, Mapping[str, str]],
        on_exit: Callable[[str, int, str], None],
        modules: Mapping[str, str] = WORKER_MODULES,
    ) -> None:
        self.loop = loop
        self.envs = {name: dict(env) for name, env in envs.items()}  # worker -> its whole environment
        self.on_exit = on_exit
        self.modules = dict(modules)
        self.pidfds: dict[int, int] = {}

    def spawn(self, worker: str) -> int:
        argv = [sys.executable, "-m", self.modules[worker]]
        # posix_spawn (vfork-like in glibc): the cheapest way to start a process. Our fds are
        # non-inheritable (PEP 446), so the child gets stdin/stdout/stderr only.
        pid = os.posix_spawn(sys.executable, argv, self.envs[worker])
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            # No pidfd (out of descriptors, LimitNOFILE): a child we could not watch must not live
            # on unseen; the policy counts this as a failed start.
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
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
