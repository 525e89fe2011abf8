"""Logging for every process of the tree: one line per record on stderr (the journal).

Records of warning and above can also be handed to a sink (a worker forwards them to
the supervisor, which routes them to the MQTT worker for the logs topic).
"""

from __future__ import annotations

import logging
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


def setup(process: str, level: int = logging.INFO) -> logging.Logger:
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{process}[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    logging.Formatter.converter = time.gmtime
    return logging.getLogger(process)
