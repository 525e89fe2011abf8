"""The supervisor's OS boundary with real processes."""

from __future__ import annotations

import subprocess
import sys

CODE = r"""
import os, resource
from infoscreen.loop import Loop
from infoscreen.supervisor.process import OsProcesses
procs = OsProcesses(Loop(), {"w": dict(os.environ)}, lambda *a: None, {"w": "this.module.is.never.imported"})
open_now = len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself had open
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now, open_now))  # no room for the pidfd
try:
    procs.spawn("w")
    print("spawned")
except OSError as exc:
    print("refused", exc.errno)
try:
    print("left", os.waitpid(-1, os.WNOHANG))
except ChildProcessError:
    print("no child left")
"""


def test_a_child_that_cannot_be_watched_is_not_left_running():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=20)
    assert r.stdout.split("\n")[:2] == ["refused 24", "no child left"], r.stdout + r.stderr
