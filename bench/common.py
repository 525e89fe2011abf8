"""Shared bits of the benchmarks: the machine line, percentiles, a tree against a real broker."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {os.cpu_count()} cores, {cpu}; Linux {platform.release()}; Python {platform.python_version()}"


def header(title: str) -> str:
    cmd = " ".join([Path(sys.executable).name if False else ".venv/bin/python", *sys.argv])
    return (f"### {title}\n\n- machine: {machine()}\n- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}\n"
            f"- command: `{cmd}`\n")


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values)


def started_tree(workdir: Path, env: dict[str, str] | None = None, helper_env: dict[str, str] | None = None,
                 watchdog_usec: int = 1_000_000):
    """(broker, tree, uuid): a provisioned broker and the whole tree in mock mode, ready."""
    from tests.support.broker import MosquittoBroker
    from tests.support.tree import Tree

    dev = str(uuid.uuid4())
    broker = MosquittoBroker([dev], workdir / "broker").start()
    tree = Tree(workdir / "tree", broker, dev, env=env or {}, watchdog_usec=watchdog_usec)
    if helper_env and tree.helper is not None:
        tree.helper.env.update(helper_env)
    tree.start()
    return broker, tree, dev


def tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="infoscreen-bench-"))
