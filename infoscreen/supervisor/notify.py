"""sd_notify for the supervisor: READY, WATCHDOG, STATUS, STOPPING (via sdnotify).

The watchdog interval comes from systemd's ``WATCHDOG_USEC`` (honoured only when
``WATCHDOG_PID`` is unset or ours); we pet at half of it, from the main loop, so a
stuck loop stops the petting and systemd restarts the service.
"""

from __future__ import annotations

import os

import sdnotify


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self._sd = sdnotify.SystemdNotifier() if self.enabled else None
        self.watchdog_interval_s: float | None = None
        usec = env.get("WATCHDOG_USEC")
        wd_pid = env.get("WATCHDOG_PID")
        if self.enabled and usec and (not wd_pid or wd_pid == str(os.getpid())):
            try:
                self.watchdog_interval_s = max(0.05, int(usec) / 1e6 / 2)
            except ValueError:
                self.watchdog_interval_s = None
        self._last_status: str | None = None

    def _send(self, text: str) -> None:
        if self._sd is not None:
            self._sd.notify(text)

    def ready(self) -> None:
        self._send("READY=1")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        text = " ".join(text.split())[:400]
        if text != self._last_status:
            self._last_status = text
            self._send(f"STATUS={text}")
