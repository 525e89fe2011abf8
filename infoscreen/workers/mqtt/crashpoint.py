"""Test hook: die by SIGKILL at a named step of the lifecycle, to prove what survives it.

Active only when ``INFOSCREEN_TEST_CRASHPOINT`` names the step and the environment is not
production (read once at import). Steps: ``after_commit`` (record committed, nothing published
or requested), ``after_publish`` (acks published, ExecRequest not yet sent),
``after_exec_request`` (sent), ``before_puback``
(an ack was published, its PUBACK arrives and the process dies before handling it);
``handle_kill`` and ``handle_raise`` (die, or raise, while handling any MQTT message whose payload
contains POISON_MARK: a poison message for the intake's tests).
"""

from __future__ import annotations

import os
import signal

_POINT = os.environ.get("INFOSCREEN_TEST_CRASHPOINT") if os.environ.get("INFOSCREEN_ENV") in ("test", "development") else None


def crash(point: str) -> None:
    if _POINT == point:
        os.kill(os.getpid(), signal.SIGKILL)


POISON_MARK = b"crashpoint-poison"


def poison(payload: bytes) -> None:
    if _POINT in ("handle_kill", "handle_raise") and POISON_MARK in payload:
        crash("handle_kill")
        raise RuntimeError("test crashpoint handle_raise")
