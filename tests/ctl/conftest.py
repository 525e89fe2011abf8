"""Fixtures of the infoscreenctl tests: the CLI run as a real process (`ctl`), against the real
broker of the root conftest, logged in with the `server.env` that provisioning wrote.

    p = ctl("send", "reboot", "--device", uuid, "--wait")   # started, --env added
    p.wait_line(r"accepted")                                # a stdout line matching, as it is printed
    assert p.wait(10) == 0

Waiting is on events: a reader thread per stream notifies a condition on every line; `wait()`
waits on the process exit. Every wait has a timeout; every process is killed at teardown.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]


class CtlProcess:
    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.argv = argv
        full_env = dict(os.environ)
        full_env.pop("INFOSCREENCTL_ENV", None)
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        self._cond = threading.Condition()
        self.out: list[str] = []
        self.err: list[str] = []
        self._closed = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "infoscreen.ctl.cli", *argv],
            cwd=ROOT, env=full_env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read(self, stream, sink: list[str]) -> None:
        for raw in stream:
            with self._cond:
                sink.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._closed += 1
            self._cond.notify_all()

    def _wait_in(self, sink: list[str], pattern: str, timeout: float, name: str) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in sink:
                    if rx.search(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed == 2:
                    raise TimeoutError(f"no {name} line matching {pattern!r} within {timeout} s; "
                                       f"stdout={self.out!r} stderr={self.err!r} rc={self.proc.poll()}")
                self._cond.wait(remaining)

    def wait_line(self, pattern: str, timeout: float = 10.0) -> str:
        return self._wait_in(self.out, pattern, timeout, "stdout")

    def wait_err(self, pattern: str, timeout: float = 10.0) -> str:
        return self._wait_in(self.err, pattern, timeout, "stderr")

    def wait(self, timeout: float = 10.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"infoscreenctl {' '.join(self.argv)} still running after {timeout} s; "
                               f"stdout={self.out!r} stderr={self.err!r}") from None
        for t in self._threads:
            t.join(timeout=5)
        return rc

    @property
    def stdout(self) -> str:
        with self._cond:
            return "\n".join(self.out)

    @property
    def stderr(self) -> str:
        with self._cond:
            return "\n".join(self.err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def ctl_raw() -> Iterator[Callable[..., CtlProcess]]:
    """`ctl_raw(*argv, env=None) -> CtlProcess`: infoscreenctl exactly as given."""
    made: list[CtlProcess] = []

    def run(*argv: str, env: dict[str, str] | None = None) -> CtlProcess:
        p = CtlProcess(list(argv), env)
        made.append(p)
        return p

    yield run
    for p in made:
        p.kill()


@pytest.fixture
def ctl(broker, ctl_raw) -> Callable[..., CtlProcess]:
    """`ctl(*argv) -> CtlProcess`: infoscreenctl with `--env <the broker's server.env>` appended."""

    def run(*argv: str, env: dict[str, str] | None = None) -> CtlProcess:
        return ctl_raw(*argv, "--env", str(broker.server_env_path), env=env)

    return run
