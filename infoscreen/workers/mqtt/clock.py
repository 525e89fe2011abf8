"""Time for expiry decisions, without trusting a clock that has not been synchronised.

Screens without a real-time clock boot with a stale wall clock until NTP syncs. Rules
(docs/mqtt-worker.md, "Clock rules"):

* Synchronised (``/run/systemd/timesync/synchronized`` exists, or ``adjtimex`` reports a
  synchronised kernel clock, or ``INFOSCREEN_CLOCK_TRUST=always``): ``expires_at`` is
  judged by the wall clock. An ``expires_at`` more than :data:`MAX_AHEAD_S` ahead is
  refused as ``invalid_payload``.
* Not synchronised: a monotonic budget from receipt, ``expires_at - issued_at``
  (bounded by :data:`MAX_AHEAD_S`), or :data:`DEFAULT_BUDGET_S` when ``issued_at`` is
  absent. A budget <= 0 is ``expired``.

The clock is an object so unit tests can inject one (:class:`FakeClock`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from dataclasses import dataclass

from ...wire.schema import ErrorCode

MAX_AHEAD_S = 7 * 86400.0  # an expires_at further ahead than this is not a real command
DEFAULT_BUDGET_S = 600.0  # unsynchronised clock and no issued_at: ten minutes from receipt
REJECTION_TTL_S = 600.0  # how long a `failed` ack of a rejected payload is retried
RECORD_KEEP_S = 24 * 3600.0  # a command record is kept this long past its expiry/receipt

TIMESYNC_FLAG = "/run/systemd/timesync/synchronized"
TIME_ERROR = 5
STA_UNSYNC = 0x0040


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """struct timex of <sys/timex.h> (Linux), with the trailing padding."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    ]


_libc = None


def adjtimex_synchronized() -> bool | None:
    """The kernel's view (adjtimex with modes=0, read-only); None if unavailable."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        tx = _Timex()
        tx.modes = 0
        state = _libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != TIME_ERROR and not (tx.status & STA_UNSYNC)


class Clock:
    """Wall and monotonic time plus the synchronisation test."""

    def wall(self) -> float:
        raise NotImplementedError

    def mono(self) -> float:
        raise NotImplementedError

    def synchronized(self) -> bool:
        raise NotImplementedError

    def since_boot(self) -> float:
        """Seconds since this boot began, on the monotonic clock."""
        raise NotImplementedError


def _boot_mono_offset() -> float:
    """Where this boot began on CLOCK_MONOTONIC: the start time of PID 1.

    On a device it is about 0 (the kernel's monotonic clock starts at boot). In a container
    the monotonic clock is the host's and does not restart with the container's boot; PID 1's
    start time (field 22 of /proc/1/stat, in clock ticks since the kernel booted) marks it.
    """
    try:
        with open("/proc/1/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        fields = stat[stat.rindex(")") + 2:].split()
        return int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0  # a lower bound of the time since boot: acks may be kept longer, never less


class SystemClock(Clock):
    CACHE_S = 1.0

    def __init__(self, trust: str = "auto", flag_path: str = TIMESYNC_FLAG) -> None:
        self.trust = trust
        self.flag_path = flag_path
        self._cached: tuple[float, bool] | None = None
        self._boot_offset: float | None = None

    def wall(self) -> float:
        return time.time()

    def mono(self) -> float:
        # CLOCK_MONOTONIC: comparable across the processes of one boot.
        return time.monotonic()

    def since_boot(self) -> float:
        if self._boot_offset is None:
            self._boot_offset = _boot_mono_offset()
        return time.monotonic() - self._boot_offset

    def synchronized(self) -> bool:
        if self.trust == "always":
            return True
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < self.CACHE_S:
            return self._cached[1]
        synced = os.path.exists(self.flag_path) or bool(adjtimex_synchronized())
        self._cached = (now, synced)
        return synced


class FakeClock(Clock):
    def __init__(self, wall: float = 1_775_376_000.0, mono: float = 1000.0, synced: bool = True) -> None:
        self._wall, self._mono, self.synced = wall, mono, synced

    def wall(self) -> float:
        return self._wall

    def mono(self) -> float:
        return self._mono

    def synchronized(self) -> bool:
        return self.synced

    def since_boot(self) -> float:
        return self._mono  # a fake boot starts at monotonic 0

    def advance(self, seconds: float) -> None:
        self._wall += seconds
        self._mono += seconds


@dataclass
class Deadline:
    """When a command (and so every ack of it) expires, judged without a bad clock.

    ``expires_wall`` is the server's ``expires_at``; ``deadline_mono`` the monotonic
    deadline in the boot ``boot_id``; ``updated_mono`` the monotonic time of the last
    status change in that boot (to carry what was left of the budget over a reboot
    while the clock is still unsynchronised).
    """

    expires_wall: float
    deadline_mono: float
    boot_id: str | None
    updated_mono: float

    def expired(self, clock: Clock, boot_id: str | None) -> bool:
        if clock.synchronized():
            return clock.wall() >= self.expires_wall
        if boot_id is not None and boot_id == self.boot_id:
            return clock.mono() >= self.deadline_mono
        # Another boot and no trustworthy wall clock: what was left at the last status
        # change, counted from this boot's start. A lower bound of the time spent (the time
        # the device was off is not counted): an ack may be kept too long, never dropped early.
        remaining = self.deadline_mono - self.updated_mono
        return clock.since_boot() >= remaining

    def remaining(self, clock: Clock, boot_id: str | None) -> float:
        if clock.synchronized():
            return self.expires_wall - clock.wall()
        if boot_id is not None and boot_id == self.boot_id:
            return self.deadline_mono - clock.mono()
        return (self.deadline_mono - self.updated_mono) - clock.since_boot()


TIMESYNCD_CLOCK_FILE = "/var/lib/systemd/timesync/clock"  # its mtime: the last synchronised time


def wall_floor_from_timesyncd(path: str = TIMESYNCD_CLOCK_FILE) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def judge(expires_at: float, issued_at: float | None, clock: Clock, boot_id: str | None,
          wall_floor: float | None = None) -> tuple[str | None, str | None, Deadline | None]:
    """(error_code, error_message, deadline) for a command received now.

    error_code is None for a command still valid, ``expired`` or ``invalid_payload``.
    ``wall_floor`` is a time this device is known to have reached (seen while synchronised):
    with an unsynchronised clock, an ``expires_at`` at or before it is expired for certain,
    however long the command's budget (a command queued over a weekend while the screen was
    off must not run at its next boot, before NTP).
    """
    now_w, now_m = clock.wall(), clock.mono()
    if not clock.synchronized() and wall_floor is not None and expires_at <= wall_floor:
        return (ErrorCode.EXPIRED.value, f"expires_at is {wall_floor - expires_at:.0f} s before a time this device has already "
                "seen (clock not synchronised yet)", None)
    if clock.synchronized():
        left = expires_at - now_w
        if left <= 0:
            return ErrorCode.EXPIRED.value, f"expires_at is {-left:.0f} s in the past (clock synchronised)", None
        if left > MAX_AHEAD_S:
            return (ErrorCode.INVALID_PAYLOAD.value,
                    f"expires_at is {left / 86400:.1f} days ahead; more than {MAX_AHEAD_S / 86400:.0f} days is refused", None)
        return None, None, Deadline(expires_at, now_m + left, boot_id, now_m)
    if issued_at is None:
        budget = DEFAULT_BUDGET_S
    else:
        budget = expires_at - issued_at
        if budget <= 0:
            return ErrorCode.EXPIRED.value, "expires_at is not after issued_at (clock not synchronised: judged by the budget)", None
        if budget > MAX_AHEAD_S:
            return (ErrorCode.INVALID_PAYLOAD.value,
                    f"expires_at - issued_at is {budget / 86400:.1f} days; more than {MAX_AHEAD_S / 86400:.0f} days is refused", None)
    return None, None, Deadline(expires_at, now_m + budget, boot_id, now_m)


def rejection_deadline(clock: Clock, boot_id: str | None) -> Deadline:
    """The retry window of a `failed` ack for a payload rejected on receipt."""
    now_m = clock.mono()
    return Deadline(clock.wall() + REJECTION_TTL_S, now_m + REJECTION_TTL_S, boot_id, now_m)
