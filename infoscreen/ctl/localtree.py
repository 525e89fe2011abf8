"""A whole screen on this machine, for the demo, the tests and the benchmarks: the environment of
the root helper in mock mode and of the supervisor with its two workers, built one way.

The demo (infoscreen/ctl/demo.py) starts its tree with these; the tests' Tree
(tests/support/tree.py, which the benchmarks use too) builds the same environments (a test ties
them), so what the demo shows is what the tests check.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Mapping
from pathlib import Path

DISPLAY_NAME = "display_manager"
# The variables of the calling environment that would leak into the tree's configuration.
_OWN_PREFIXES = ("MQTT_", "INFOSCREEN_", "HELPER_")

try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _libc = None


def die_with_parent() -> None:
    """In each child between fork and exec: die with the parent (PR_SET_PDEATHSIG), even on its
    SIGKILL, so no part of a local tree outlives what started it."""
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)


def helper_env(sock: Path, state: Path, **overrides: str) -> dict[str, str]:
    """The helper in mock mode (it executes nothing) on socket `sock`, answering this user."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HELPER_SOCKET": str(sock),
        "HELPER_STATE_DIR": str(state),
        "HELPER_ALLOWED_USERS": str(os.getuid()),
        "HELPER_ALLOWED_GROUPS": str(os.getgid()),
        "HELPER_GRACE_S": "0",
        "HELPER_MAX_ACTIONS_PER_HOUR": "100000",
        "INFOSCREEN_ENV": "development",
        "COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE": "1",
    }
    env.update(overrides)
    return env


def supervisor_env(*, state_dir: Path, runtime_dir: Path, helper_socket: Path, device_env: Mapping[str, str],
                   base: Mapping[str, str] | None = None, **overrides: str) -> dict[str, str]:
    """The supervisor's environment: `base` (default: this process's) without the variables of the
    client and the helper, the tree's own settings (short intervals, mock execution allowed),
    the device's variables (a provisioned ``devices/<uuid>.env``), then `overrides`."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(_OWN_PREFIXES)}
    env.update({
        "INFOSCREEN_ENV": "test",
        "INFOSCREEN_STATE_DIR": str(state_dir),
        "INFOSCREEN_RUNTIME_DIR": str(runtime_dir),
        "HELPER_SOCKET": str(helper_socket),
        "HEARTBEAT_INTERVAL_S": "1",
        "HEALTH_INTERVAL_S": "1",
        "WORKER_HEARTBEAT_S": "0.2",
        "WORKER_HANG_TIMEOUT_S": "1.5",
        "HELPER_TIMEOUT_S": "2",
        "REBOOT_GRACE_S": "5",
        "DISPLAY_PROCESS_NAME": DISPLAY_NAME,
        "PYTHONUNBUFFERED": "1",
    })
    env.update(device_env)
    env.update(overrides)
    return env
