"""States of a supervised worker and the events that move it (a leaf module: no imports).

    BACKOFF --deadline--> STARTING --hello--> RUNNING
    STARTING/RUNNING --silence past the hang timeout--> STOPPING (SIGTERM, then SIGKILL)
    any live state --exited--> STARTING (was ready a while) | BACKOFF | FATAL (intensity)
    any --stop--> STOPPING --exited--> STOPPED
"""

from __future__ import annotations

import enum


class State(str, enum.Enum):
    STARTING = "starting"  # spawned, no hello yet
    RUNNING = "running"  # said hello, heartbeating
    BACKOFF = "backoff"  # exited; waiting before the next start
    STOPPING = "stopping"  # signalled; waiting for it to exit
    STOPPED = "stopped"  # stopped on purpose (shutdown)
    FATAL = "fatal"  # restart intensity exceeded: the supervisor escalates


class Event(str, enum.Enum):
    START = "start"  # first start of the tree
    HELLO = "hello"
    HEARTBEAT = "heartbeat"
    EXITED = "exited"
    DEADLINE = "deadline"  # the state's deadline passed
    STOP = "stop"  # shutdown of the tree


LIVE = frozenset({State.STARTING, State.RUNNING, State.STOPPING})
