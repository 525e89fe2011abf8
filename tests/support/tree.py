"""The whole process tree for tests: the helper (mock backend) and the supervisor with both
workers, against a real broker, with a real NOTIFY_SOCKET bound by the test.

    tree = Tree(tmp_path, broker, uuid).start()      # returns once READY=1 was received
    tree.worker_pid("mqtt"); tree.notify.wait_line("WATCHDOG=1")
    tree.stop()                                      # SIGTERM, waits for a clean exit

Everything it starts it stops (also if the test fails): use the `tree_factory` fixture.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from infoscreen.ctl import localtree
from tests.support.notify import NotifyListener
from tests.support.waiting import stop_process, wait_until

# The demo's environments, so the tests (and the benchmarks, which use this Tree) start a tree
# the one way the demo does.
_die_with_parent = localtree.die_with_parent
helper_env = localtree.helper_env


class Helper:
    """The real helper process in mock mode on a socket of its own."""

    def __init__(self, workdir: Path, **overrides: str) -> None:
        self.dir = workdir
        sockdir = workdir / "helper"
        sockdir.mkdir(mode=0o755, parents=True, exist_ok=True)
        state = workdir / "helper-state"
        state.mkdir(mode=0o700, exist_ok=True)
        self.socket = sockdir / "helper.sock"
        self.env = helper_env(self.socket, state, **overrides)
        self.log_path = workdir / "helper.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Helper":
        try:
            self.socket.unlink()
        except FileNotFoundError:
            pass
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "infoscreen.helper"], env=self.env, stdout=log, stderr=log,
                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
            )
        wait_until(lambda: self.socket.exists() or self.proc.poll() is not None, 10, what="helper socket")
        if self.proc.poll() is not None:
            raise RuntimeError(f"helper exited {self.proc.returncode}: {self.log_text()[-2000:]}")
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc)


class Tree:
    def __init__(
        self,
        workdir: Path,
        broker=None,
        uuid: str | None = None,
        *,
        helper: bool = True,
        watchdog_usec: int = 1_000_000,
        env: dict[str, str] | None = None,
    ) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        # ipc:// paths are limited to ~107 bytes: keep the runtime dir short, not under tmp_path.
        self.runtime = Path(tempfile.mkdtemp(prefix="ist-", dir="/tmp"))
        self.state = self.dir / "state"
        self.helper = Helper(self.dir) if helper else None
        self.notify = NotifyListener(self.runtime / "notify.sock")
        self.log_path = self.dir / "supervisor.log"
        self.proc: subprocess.Popen | None = None
        device_env: dict[str, str] = {}
        if broker is not None:
            assert uuid is not None
            device_env = {**broker.device_env(uuid), "MQTT_BROKER": broker.host, "MQTT_PORT": str(broker.port)}
        if uuid is not None:
            device_env["CLIENT_UUID"] = uuid
        self.env = localtree.supervisor_env(
            state_dir=self.state, runtime_dir=self.runtime / "run",
            helper_socket=self.helper.socket if self.helper else self.dir / "no-helper.sock",
            device_env=device_env, NOTIFY_SOCKET=self.notify.path, WATCHDOG_USEC=str(watchdog_usec))
        if env:
            self.env.update(env)

    # -- lifecycle ------------------------------------------------------------------
    def start(self, wait_ready: bool = True, timeout: float = 15.0) -> "Tree":
        if self.helper is not None and (self.helper.proc is None or self.helper.proc.poll() is not None):
            self.helper.start()
        self._ready_mark = len(self.notify.records)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "infoscreen.supervisor"], env=self.env, stdout=log, stderr=log,
                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
            )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Until READY=1 arrives; fails at once (with the log) if the supervisor exits first."""
        mark = self._ready_mark
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.notify.wait_for(lambda recs: any(l == "READY=1" for _, l in recs[mark:]),
                                     min(0.5, max(0.0, deadline - time.monotonic())), "READY=1")
                return
            except TimeoutError:
                exited = self.proc is not None and self.proc.poll() is not None
                if exited or time.monotonic() >= deadline:
                    what = f"exited {self.proc.returncode}" if exited else f"not ready in {timeout} s"
                    raise TimeoutError(f"tree {what}; log:\n{self.log_text()[-4000:]}") from None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def workers(self) -> dict[str, int]:
        """Live worker pids by name, from the supervisor's children's command lines."""
        out: dict[str, int] = {}
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return out
        for child in children:
            try:
                cmd = child.cmdline()
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.Error:
                continue
            for name in ("mqtt", "health"):
                if f"infoscreen.workers.{name}" in cmd:
                    out[name] = child.pid
        return out

    def worker_pid(self, name: str, timeout: float = 10.0, not_pid: int | None = None) -> int:
        return wait_until(
            lambda: (p := self.workers().get(name)) and p != not_pid and p, timeout, what=f"{name} worker"
        )

    def wait_running(self, name: str, *, after_pid: int | None = None, timeout: float = 15.0) -> int:
        """Wait until a worker (other than after_pid) said hello: STATUS shows it running again."""
        pid = self.worker_pid(name, timeout, not_pid=after_pid)
        wait_until(lambda: f"worker {name}: starting -> running" in self.log_text()
                   and self._said_hello(name, pid), timeout, what=f"{name} hello")
        return pid

    def _said_hello(self, name: str, pid: int) -> bool:
        text = self.log_text()
        idx = text.rfind(f"worker {name}: stopped -> starting (pid {pid})")
        if idx < 0:
            idx = text.rfind(f"-> starting (pid {pid})")
        return idx >= 0 and f"worker {name}: starting -> running" in text[idx:]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_exit(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        return stop_process(self.proc, timeout)

    def cleanup(self) -> None:
        workers = list(self.workers().values()) if self.proc and self.proc.poll() is None else []
        self.stop()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.helper is not None:
            self.helper.stop()
        self.notify.close()
        shutil.rmtree(self.runtime, ignore_errors=True)
