"""Probes of the display process and the host (psutil).

Each probe returns a value or raises; :func:`collect` runs them all and turns a failed
probe into an entry of ``probe_errors`` (permission denied, a process that vanished
mid-read), so one bad probe never costs the report or the worker.
"""

from __future__ import annotations

import os
import pwd
import time
from pathlib import Path

import psutil

from ...ipc.messages import DisplayState, HealthReport, HostFacts
from ...wire.schema import utc_now_iso

RUNNING_STATUSES = {
    psutil.STATUS_RUNNING, psutil.STATUS_SLEEPING, psutil.STATUS_DISK_SLEEP, psutil.STATUS_IDLE,
    psutil.STATUS_WAKING, psutil.STATUS_PARKED,
}


def uid_as_seen_here(host_uid: int) -> int:
    """The uid the kernel shows this process for ``host_uid``: itself in the initial user namespace.
    Under the unit's PrivateUsers=yes only root and the service's own uid are mapped, and every
    other uid shows as the overflow uid (nobody): the display's user then looks like any other
    foreign user, but never like the service's own uid, which is what the owner check is for."""
    try:
        lines = Path("/proc/self/uid_map").read_text().splitlines()
    except OSError:
        return host_uid
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            inside, outside, count = (int(p) for p in parts)
            if outside <= host_uid < outside + count:
                return inside + host_uid - outside
    try:
        return int(Path("/proc/sys/kernel/overflowuid").read_text())
    except (OSError, ValueError):
        return 65534


def _status_of(proc: psutil.Process) -> str:
    st = proc.status()
    if st in RUNNING_STATUSES:
        return "running"
    if st in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
        return "stopped"
    if st in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
        return "zombie"
    return "unknown"


class DisplayProbe:
    """Finds the display process by pidfile or by name; remembers it between reports.

    With ``user`` (DISPLAY_PROCESS_USER, a user name or uid) only a process whose real uid is that
    user's is the display: any process of the tree's own uid could take the display's name, but
    not another user's uid. The real uid, not the effective one, because a setuid program changes
    only the latter. An unknown user is a probe error (status unknown), never a match. The uid is
    compared as the kernel shows it in our user namespace (:func:`uid_as_seen_here`).
    """

    def __init__(self, name: str, pidfile: str | None = None, user: str | None = None) -> None:
        self.name = name
        self.pidfile = pidfile
        self.user = user
        self._uid: int | None = None
        self._proc: psutil.Process | None = None

    def owner_uid(self) -> int | None:
        """The uid the display must show as here (None: any); raises LookupError for an unknown user."""
        if self.user is None:
            return None
        if self._uid is None:
            if self.user.isascii() and self.user.isdigit():
                host_uid = int(self.user)
            else:
                try:
                    host_uid = pwd.getpwnam(self.user).pw_uid
                except KeyError:
                    raise LookupError(f"DISPLAY_PROCESS_USER {self.user[:64]!r} is not a user here") from None
            self._uid = uid_as_seen_here(host_uid)
            if self._uid == os.getuid() and host_uid != os.getuid():
                # Cannot happen with a sane mapping; if it did, our own processes would pass.
                raise LookupError("DISPLAY_PROCESS_USER cannot be told from our own uid here")
        return self._uid

    def _owned(self, proc: psutil.Process, uid: int | None) -> bool:
        return uid is None or proc.uids().real == uid

    def _matches(self, proc: psutil.Process, uid: int | None) -> bool:
        try:
            if not self._owned(proc, uid):
                return False
            if proc.name() == self.name:
                return True
            cmdline = proc.cmdline()
            return bool(cmdline) and os.path.basename(cmdline[0]) == self.name
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    def _find(self) -> psutil.Process | None:
        uid = self.owner_uid()
        if self.pidfile:
            try:
                pid = int(Path(self.pidfile).read_text().strip())
            except (OSError, ValueError):
                return None
            try:
                proc = psutil.Process(pid)
                return proc if self._owned(proc, uid) else None
            except psutil.NoSuchProcess:
                return None
        if self._proc is not None and self._proc.is_running() and self._matches(self._proc, uid):
            return self._proc  # the common case: no scan of every process
        for proc in psutil.process_iter():
            if self._matches(proc, uid):
                return proc
        return None

    def probe(self) -> DisplayState:
        self._proc = self._find()
        if self._proc is None:
            return DisplayState(process=self.name, pid=None, status="not_running")
        try:
            return DisplayState(process=self.name, pid=self._proc.pid, status=_status_of(self._proc))
        except psutil.NoSuchProcess:
            self._proc = None
            return DisplayState(process=self.name, pid=None, status="not_running")


def _temperature() -> float | None:
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return None
    sensors = read()
    for key in ("cpu_thermal", "coretemp", "k10temp", "soc_thermal", "acpitz"):  # Pi first
        if sensors.get(key):
            return round(sensors[key][0].current, 1)
    for entries in sensors.values():
        if entries:
            return round(entries[0].current, 1)
    return None  # no sensor on this host: not an error


class HostProbe:
    def __init__(self, disk_path: str, boot_id_file: str) -> None:
        self.disk_path = disk_path
        self.boot_id_file = boot_id_file
        psutil.cpu_percent(interval=None)  # prime: the next call measures since now

    def probe(self, errors: list[str]) -> HostFacts:
        def attempt(what, fn):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - reported, never fatal
                errors.append(f"{what}: {exc.__class__.__name__}: {str(exc)[:120]}")
                return None

        return HostFacts(
            cpu_percent=attempt("cpu", lambda: psutil.cpu_percent(interval=None)),
            memory_percent=attempt("memory", lambda: psutil.virtual_memory().percent),
            disk_percent=attempt("disk", lambda: psutil.disk_usage(self.disk_path).percent),
            temperature_c=attempt("temperature", _temperature),
            uptime_s=attempt("uptime", lambda: round(time.time() - psutil.boot_time(), 1)),
            boot_id=attempt("boot_id", lambda: Path(self.boot_id_file).read_text().strip()[:64]),
            load_1m=attempt("load", lambda: round(os.getloadavg()[0], 2)),
        )


def collect(display: DisplayProbe, host: HostProbe) -> HealthReport:
    errors: list[str] = []
    try:
        actual = display.probe()
    except Exception as exc:  # noqa: BLE001
        errors.append(f"display: {exc.__class__.__name__}: {str(exc)[:120]}")
        actual = DisplayState(process=display.name, pid=None, status="unknown")
    facts = host.probe(errors)
    return HealthReport(timestamp=utc_now_iso(), actual_state=actual, host=facts, probe_errors=errors)
