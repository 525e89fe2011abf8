"""Waiting without sleeping: on a condition, an event, or a process's pidfd; always with a timeout.

`wait_until(predicate)` without a `cond`/`event` has to poll (for state with no event source, such
as a file another process writes): it re-checks at a short, growing interval (1 ms to 20 ms), never
at a fixed long tick. Prefer passing the condition/event the state change is signalled on.
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import Callable, TypeVar

from tests.support.broker import free_port

__all__ = ["free_port", "wait_until", "wait_process_exit"]

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 5.0,
    *,
    cond: threading.Condition | None = None,
    event: threading.Event | None = None,
    what: str | None = None,
) -> T:
    """Return the first truthy value of `predicate()`, or raise `TimeoutError` after `timeout` s.

    - `cond`: wait on it (the caller's notifier must `notify_all()` under it); predicate is
      evaluated with the condition held.
    - `event`: woken when it is set (then cleared and the predicate re-checked).
    - neither: re-check at a short growing interval (1 ms .. 20 ms).
    """
    deadline = time.monotonic() + timeout
    label = what or getattr(predicate, "__name__", "condition")
    if cond is not None:
        with cond:
            value = cond.wait_for(predicate, timeout)
        if value:
            return value
        raise TimeoutError(f"{label}: not true within {timeout} s")
    delay = 0.001
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{label}: not true within {timeout} s")
        if event is not None:
            if event.wait(remaining):
                event.clear()
        else:
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.02)


def wait_process_exit(pid: int, timeout: float = 5.0) -> None:
    """Wait until process `pid` (any process, not only a child) exits, on its pidfd (woken by the
    kernel at the exit). Returns at once if it does not exist. Does not reap it."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise TimeoutError(f"process {pid} still running after {timeout} s")
    finally:
        os.close(fd)


def stop_process(proc, timeout: float = 5.0):
    """Stop a child started by a test: SIGCONT (it may be SIGSTOPped), SIGTERM, SIGKILL after
    `timeout`; waits for it and returns its exit status (None if it was never started)."""
    import signal
    import subprocess

    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode
