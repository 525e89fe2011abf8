"""What runs on this screen, for the health payload's `agent` block: read once per process."""

from __future__ import annotations

import socket

from . import __version__
from .wire.schema import Agent

OS_RELEASE = ("/etc/os-release", "/usr/lib/os-release")  # os-release(5): the first that exists


def os_name(paths: tuple[str, ...] = OS_RELEASE) -> str | None:
    """PRETTY_NAME of os-release(5), unquoted; None when neither file is readable."""
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.read(16384).splitlines()
        except OSError:
            continue
        for line in lines:
            key, sep, value = line.partition("=")
            if sep and key.strip() == "PRETTY_NAME":
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                    value = value[1:-1]
                return value[:200] or None
        return None
    return None


def describe() -> Agent:
    return Agent(version=__version__, hostname=socket.gethostname()[:255], os=os_name())
