"""Logging for every process of the tree: one line per record on stderr (the journal).

When stderr is the journal (``JOURNAL_STREAM`` names its device and inode, as systemd sets it),
every line starts with its syslog priority, ``<4>`` for a warning: journald strips it and files
the line at that priority (``SyslogLevelPrefix=``, on by default), so ``journalctl -p warning``
shows the warnings and errors. Elsewhere (a terminal, a test's pipe) lines stay plain.

Records of warning and above can also be handed to a sink (a worker forwards them to
the supervisor, which routes them to the MQTT worker for the logs topic).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

LEVEL_NAMES = {logging.ERROR: "error", logging.WARNING: "warn", logging.INFO: "info"}


def wire_level(levelno: int) -> str:
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warn"
    return "info"


class SinkHandler(logging.Handler):
    """Hands (level, message, created) to a callback; never raises into the caller."""

    def __init__(self, sink: Callable[[str, str, float], None], level: int = logging.WARNING) -> None:
        super().__init__(level)
        self._sink = sink
        self._busy = False

    def emit(self, record: logging.LogRecord) -> None:
        if self._busy:  # a record logged while forwarding one: never recurse
            return
        self._busy = True
        try:
            self._sink(wire_level(record.levelno), record.getMessage()[:2000], record.created)
        except Exception:  # noqa: BLE001 - logging must not take the process down
            pass
        finally:
            self._busy = False


def syslog_priority(levelno: int) -> int:
    """sd-daemon(3)'s priorities: err 3, warning 4, info 6, debug 7 (crit 2)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    return 6 if levelno >= logging.INFO else 7


class JournalFormatter(logging.Formatter):
    """Each line of a record (a traceback too) prefixed with the record's priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def is_journal(stream, environ=os.environ) -> bool:
    """Is this stream the one systemd connected to the journal (JOURNAL_STREAM=dev:ino)?"""
    want = environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return bool(want) and want == f"{st.st_dev}:{st.st_ino}"


def setup(process: str, level: int = logging.INFO) -> logging.Logger:
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    fmt = f"{process}[%(process)d] %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(JournalFormatter(fmt) if is_journal(sys.stderr) else logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    logging.Formatter.converter = time.gmtime
    return logging.getLogger(process)
