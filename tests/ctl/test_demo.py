"""The README's first command, end to end: `scripts/demo` (bootstrap, then infoscreen/ctl/demo.py)
against a real Mosquitto (TLS, as provisioned by default), the real helper in mock mode holding the
screen's command key, and the real supervisor with both workers; the commands signed as `send`
signs them.

Checks its exit status, the key lines of each step, and that nothing it started is left running
(no process refers to its temporary directory) and the directory is gone. A second test interrupts
it (SIGINT, as Ctrl-C) in the middle and checks the same cleanup.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]


class Demo:
    def __init__(self, argv: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "INFOSCREEN", "HELPER_"))}
        env["PYTHONUNBUFFERED"] = "1"
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.done = False
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self.cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.done = True
            self.cond.notify_all()

    def wait_line(self, pattern: str, timeout: float) -> str:
        rx = re.compile(pattern)

        def find():
            return next((l for l in self.lines if rx.search(l)), None) or (self.done and "<eof>")

        with self.cond:
            found = self.cond.wait_for(find, timeout)
        if not found or found == "<eof>":
            raise TimeoutError(f"no line matching {pattern!r}; output:\n{self.text}")
        return found

    @property
    def text(self) -> str:
        with self.cond:
            return "\n".join(self.lines)

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"demo still running after {timeout} s; output:\n{self.text}") from None
        with self.cond:
            self.cond.wait_for(lambda: self.done, 5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@pytest.fixture
def demo_runner():
    made: list[Demo] = []

    def run(argv: list[str]) -> Demo:
        d = Demo(argv)
        made.append(d)
        return d

    yield run
    for d in made:
        d.kill()


def workdir_of(demo: Demo) -> Path:
    m = re.search(r"Everything lives in (/tmp/isd-\S+) and", demo.text)
    assert m, demo.text
    return Path(m.group(1))


def processes_using(path: Path) -> list[str]:
    """Processes whose command line mentions `path` (the broker's config, the supervisor's env file)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if str(path) in cmd and p.info["pid"] != os.getpid():
            out.append(f"{p.info['pid']}: {cmd}")
    return out


def test_demo_end_to_end(demo_runner):
    demo = demo_runner([str(ROOT / "scripts" / "demo")])
    rc = demo.wait(120)
    out = demo.text
    assert rc == 0, out
    # 1: broker provisioned and running
    assert re.search(r"^\s+\$ infoscreenctl broker provision --devices devices.txt --out broker/ --port \d+$", out, re.M)
    assert re.search(r"Mosquitto is running on 127\.0\.0\.1:\d+ \(pid \d+\), TLS only\.", out)
    # 2: the tree online
    assert re.search(r"supervisor `infoscreen-simclient` \(pid \d+\) started two workers: MQTT \(pid \d+\)", out)
    assert "is online:" in out
    # 3: the lifecycle of a reboot, in order, each status once
    s3 = out.split("[3/6]")[1].split("[4/6]")[0]
    assert re.findall(r"^\s+\+[\d.]+ (?:ms|s)\s+(\w+)", s3, re.M) == [
        "published", "accepted", "execution_started", "completed"]
    assert re.search(r"^\s+completed: device \S+ confirmed reboot_host", s3, re.M)
    assert "signed with the screen's key" in s3
    # 4: the invalid command's failed ack with its code
    s4 = out.split("[4/6]")[1].split("[5/6]")[0]
    assert re.search(r"^\s+\+[\d.]+ ms\s+failed  unsupported_action: ", s4, re.M)
    # ... and an unsigned reboot refused by the keyed screen: the demo's screen has its key
    assert re.search(r"^\s+\+[\d.]+ ms\s+failed  signature_invalid: ", s4, re.M)
    # 5: the worker killed, replaced, the command in flight completed
    s5 = out.split("[5/6]")[1].split("[6/6]")[0]
    killed = re.search(r"killed the MQTT worker \(pid (\d+)\)", s5)
    new = re.search(r"started a new MQTT worker \(pid (\d+)\)", s5)
    assert killed and new and killed.group(1) != new.group(1), s5
    assert re.findall(r"^\s+\+[\d.]+ (?:ms|s)\s+(\w+)", s5, re.M)[-1] == "completed"
    # 6: a health payload with broker_connection showing the reconnect
    s6 = out.split("[6/6]")[1]
    assert '"broker_connection": {' in s6 and '"reconnect_count": 1' in s6 and '"broker_reachable": true' in s6
    # stopped everything, removed its directory
    assert "stopped: supervisor, display, helper, mosquitto." in out
    assert re.search(r"^Demo finished in [\d.]+ s\.", out, re.M)
    workdir = workdir_of(demo)
    assert not workdir.exists()
    assert processes_using(workdir) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_interrupted_stops_everything(demo_runner, sig):
    # The python entry directly (the venv exists: the test runs in it).
    import sys

    demo = demo_runner([sys.executable, "-m", "infoscreen.ctl.demo"])
    demo.wait_line(r"^\[3/6\]", 60)  # the broker, the helper and the tree are all running
    workdir = workdir_of(demo)
    assert processes_using(workdir), "the demo's processes should be running"
    demo.proc.send_signal(sig)
    rc = demo.wait(30)
    assert rc == 130, demo.text
    assert "demo interrupted" in demo.text
    assert processes_using(workdir) == []
    assert not workdir.exists()
