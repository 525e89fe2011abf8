"""The current boot id: what tells a reboot apart from a process restart.

Read from INFOSCREEN_BOOT_ID_FILE (default ``/proc/sys/kernel/random/boot_id``); tests
point it at a file they rewrite to present a new boot without rebooting.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def read_boot_id(path: str) -> str | None:
    """The boot id (at most 64 printable characters), or None if it cannot be read."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(256).strip()
    except OSError as exc:
        log.warning("cannot read the boot id from %s: %s", path, exc.strerror)
        return None
    if not text or len(text) > 64 or not text.isprintable():
        log.warning("the boot id in %s is not a short printable string", path)
        return None
    return text


def seconds_since_boot() -> float | None:
    """CLOCK_BOOTTIME-ish uptime from /proc/uptime (includes suspend)."""
    try:
        with open("/proc/uptime", encoding="ascii") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
