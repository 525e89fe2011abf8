"""Boot and downtime evidence of power commands, kept by listening to the lifecycle's transitions.

* ``last_power_command`` (health): the latest command that reached execution, its status,
  the boot ids before and after, and ``seconds_to_reconnect`` (execution_started to the first
  broker connection of the new boot, by the wall clock: only when it was synchronised at
  execution_started and is again now).
* the shutdown evidence: when a real ``shutdown_host`` was completed, so that the next boot
  can say on ``logs/info`` which command powered the screen off and for how long.

:meth:`Evidence.on_transition` returns the values to write in the transaction of the status
change (so evidence and status never disagree after a crash); :meth:`Evidence.committed`
takes them once written. The values are cached: nothing here reads the store on the path of
a command (one read of each at start).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ...wire.schema import AckStatus, format_utc
from . import bootid
from .clock import Clock
from .command_states import Kind, State
from .store import Record, Store

log = logging.getLogger(__name__)

LAST_POWER = "last_power_command"
SHUTDOWN_EVIDENCE = "shutdown_evidence"
STARTED = AckStatus.EXECUTION_STARTED.value


class Evidence:
    def __init__(self, store: Store, clock: Clock, boot_id: str | None, info_log: Callable[[str], None]) -> None:
        self.store = store
        self.clock = clock
        self.boot_id = boot_id
        self.info_log = info_log
        self.reconnect_mono: float | None = None
        self._last: dict[str, Any] | None = store.kv_get(LAST_POWER)
        self._shutdown: dict[str, Any] | None = store.kv_get(SHUTDOWN_EVIDENCE)

    # -- transitions --------------------------------------------------------------------------
    def on_transition(self, rec: Record, kind: Kind | None, new: State) -> dict[str, Any]:
        """What to commit with the record's new status (``rec`` carries it already)."""
        kv: dict[str, Any] = {}
        if rec.exec_boot_id is not None:  # it reached execution
            kv[LAST_POWER] = self._last_power(rec)
        if new is State.COMPLETED and kind is Kind.SHUTDOWN:
            same_boot = rec.exec_boot_id == self.boot_id  # else: completed at the next start
            kv[SHUTDOWN_EVIDENCE] = {
                "command_id": rec.command_id, "boot_id": rec.exec_boot_id,
                "acked_wall": self.clock.wall() if same_boot else None,
                "synced": self.clock.synchronized(), "reported": False,
            }
        return kv

    def committed(self, kv: dict[str, Any]) -> None:
        if LAST_POWER in kv:
            self._last = kv[LAST_POWER]
        if SHUTDOWN_EVIDENCE in kv:
            self._shutdown = kv[SHUTDOWN_EVIDENCE]

    def _last_power(self, rec: Record) -> dict[str, Any]:
        ev = dict(self._last or {})
        if ev.get("command_id") != rec.command_id:
            ev = {
                "command_id": rec.command_id,
                "action": rec.action,
                "status": rec.status,
                "boot_id_before": rec.exec_boot_id,
                "boot_id_after": None,
                "seconds_to_reconnect": None,
                "execution_started_at": format_utc(rec.exec_wall) if rec.exec_wall else None,
                "_exec_wall": rec.exec_wall,
                "_synced_at_start": self.clock.synchronized(),
            }
        ev["status"] = rec.status
        if rec.status != STARTED:
            ev["error_code"] = rec.error_code
        if self.boot_id and rec.exec_boot_id != self.boot_id:
            ev["boot_id_after"] = self.boot_id
        return ev

    # -- the broker connection and the clock --------------------------------------------------
    def on_connected(self) -> None:
        if self.reconnect_mono is None:
            self.reconnect_mono = self.clock.mono()
        self.refresh()

    def refresh(self) -> None:
        """Fill in what needs a synchronised clock once it is (seconds_to_reconnect, off time)."""
        if self.reconnect_mono is None or not self.clock.synchronized():
            return
        ev = self._last
        if ev and ev.get("seconds_to_reconnect") is None and ev.get("boot_id_before") not in (None, self.boot_id) \
                and ev.get("_exec_wall") and ev.get("_synced_at_start"):
            ev = dict(ev)
            reconnect_wall = self.clock.wall() - (self.clock.mono() - self.reconnect_mono)
            ev["seconds_to_reconnect"] = round(max(0.0, reconnect_wall - ev["_exec_wall"]), 1)
            ev["boot_id_after"] = self.boot_id
            self.store.kv_set(LAST_POWER, ev)
            self._last = ev
        sd = self._shutdown
        if sd and not sd.get("reported") and sd.get("boot_id") != self.boot_id:
            self._report_off_time(dict(sd))

    def _report_off_time(self, sd: dict[str, Any]) -> None:
        now = self.clock.wall()
        up = bootid.seconds_since_boot()
        acked = sd.get("acked_wall")
        if acked is not None and sd.get("synced"):
            off = (now - up - acked) if up is not None else None
            if off is not None and off >= 0:
                text = (f"this screen was powered off by command {sd['command_id']} (shutdown_host) at "
                        f"{format_utc(acked)} and was off for {off:.0f} s (up again since {format_utc(now - up)})")
            else:
                text = (f"this screen was powered off by command {sd['command_id']} (shutdown_host) at "
                        f"{format_utc(acked)}; it is back {now - acked:.0f} s after that ack")
        else:
            text = (f"this screen was powered off by command {sd['command_id']} (shutdown_host); the off time is"
                    " unknown (the clock was not synchronised at the shutdown)")
        sd["reported"] = True
        self.store.kv_set(SHUTDOWN_EVIDENCE, sd)
        self._shutdown = sd
        log.info("%s", text)
        self.info_log(text)

    def last_power_command(self) -> dict[str, Any] | None:
        ev = self._last
        if not ev:
            return None
        return {k: v for k, v in ev.items() if not k.startswith("_")}
