"""A real NOTIFY_SOCKET bound by the test: records every sd_notify datagram the supervisor sends."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path


class NotifyListener:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)  # only so the reader thread notices close(); no test waits on it
        self.cond = threading.Condition()
        self.records: list[tuple[float, str]] = []  # (monotonic time, "KEY=VALUE")
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            now = time.monotonic()
            with self.cond:
                for line in data.decode("utf-8", "replace").splitlines():
                    self.records.append((now, line))
                self.cond.notify_all()

    def values(self, key: str) -> list[str]:
        with self.cond:
            return [line.split("=", 1)[1] for _, line in self.records if line.startswith(key + "=")]

    def times(self, line: str) -> list[float]:
        with self.cond:
            return [t for t, l in self.records if l == line]

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "notification"):
        """Wait until predicate(records) is truthy (evaluated at each new datagram)."""
        with self.cond:
            value = self.cond.wait_for(lambda: predicate(self.records), timeout)
        if not value:
            raise TimeoutError(f"{what}: not seen within {timeout} s; got {self.records[-10:]}")
        return value

    def wait_line(self, line: str, timeout: float = 10.0, after: float = 0.0) -> float:
        got = self.wait_for(
            lambda recs: next((t for t, l in recs if l == line and t >= after), None), timeout, line
        )
        return got

    def wait_status(self, predicate, timeout: float = 10.0) -> str:
        return self.wait_for(
            lambda recs: next(
                (l[7:] for _, l in reversed(recs) if l.startswith("STATUS=") and predicate(l[7:])), None
            ),
            timeout,
            "STATUS",
        )

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        try:
            Path(self.path).unlink()
        except FileNotFoundError:
            pass
