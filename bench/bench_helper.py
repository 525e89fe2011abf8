"""Benchmark: supervisor -> helper -> supervisor round trip through `call_helper`, mock backend.

Two deployments are measured, both with real processes and real Unix sockets:

* standalone: one long-running helper that binds its own socket (HELPER_SOCKET);
* per-connection: what `infoscreen-helper.socket` with Accept=yes does on a device. This script
  plays systemd's part: it accepts on a path and starts one helper instance per connection with
  the connection as fd 3 (LISTEN_FDS=1, LISTEN_PID=<instance pid>), so every round trip pays
  the instance's interpreter start, as on the device.

Plus the helper's RSS at rest (standalone, after warm-up), in the `-I -S` form and in the form
the console script runs (site enabled). Prints a markdown block.

    .venv/bin/python bench/bench_helper.py [--requests 1000] [--spawned 200]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.helper.helper_support import call_unsigned  # noqa: E402

LAUNCH = (f"import sys; sys.path.insert(0, {str(REPO)!r}); "
          "from infoscreen.helper.server import main; main()")
ISOLATED = [sys.executable, "-I", "-S", "-c", LAUNCH]
WITH_SITE = [sys.executable, "-m", "infoscreen.helper"]


def helper_env(tmp: str) -> dict:
    return {"HELPER_SOCKET": f"{tmp}/helper.sock", "HELPER_STATE_DIR": f"{tmp}/state",
            "HELPER_ALLOWED_GROUPS": str(os.getgid()), "HELPER_GRACE_S": "0",
            "HELPER_MAX_ACTIONS_PER_HOUR": "100000", "INFOSCREEN_ENV": "test",
            "COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE": "1", "PYTHONPATH": str(REPO)}


class Running:
    """A standalone helper; counts its `exec` audit lines (an action ran, the lock is free)."""

    def __init__(self, argv, env):
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()   # the "start" audit line: it listens
        assert '"event": "start"' in line, line
        self.execs, self.cond = 0, threading.Condition()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            if '"event": "exec"' in line:
                with self.cond:
                    self.execs += 1
                    self.cond.notify_all()

    def wait_execs(self, n: int, timeout=10.0):
        with self.cond:
            assert self.cond.wait_for(lambda: self.execs >= n, timeout), "helper stalled"


def stop(running: Running):
    proc = running.proc
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def percentiles(samples_ms: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(samples_ms, n=100, method="inclusive")
    return statistics.median(samples_ms), q[98], max(samples_ms)


def round_trips(path: str, n: int, after_each=None) -> tuple[list[float], dict]:
    samples, outcomes = [], {}
    for _ in range(n):
        t0 = time.perf_counter()
        outcome = call_unsigned(path, "reboot_host", str(uuid.uuid4()), 5.0)
        samples.append((time.perf_counter() - t0) * 1000)
        key = "ok" if outcome.ok else outcome.error_code
        outcomes[key] = outcomes.get(key, 0) + 1
        if after_each:
            after_each()
    return samples, outcomes


def bench_standalone(n: int) -> tuple[list[float], dict]:
    tmp = tempfile.mkdtemp(prefix="ish-bench-")
    env = helper_env(tmp)
    helper = Running(ISOLATED, env)
    done = [0]

    def action_ran():   # the action runs just after the answer: wait until the lock is free,
        done[0] += 1    # as a real client would (the next command comes much later)
        helper.wait_execs(done[0])
    try:
        round_trips(env["HELPER_SOCKET"], 20, after_each=action_ran)   # warm-up
        return round_trips(env["HELPER_SOCKET"], n, after_each=action_ran)
    finally:
        stop(helper)
        shutil.rmtree(tmp, ignore_errors=True)


def bench_per_connection(n: int) -> tuple[list[float], dict]:
    """systemd's Accept=yes, played by this process: one helper instance per connection."""
    tmp = tempfile.mkdtemp(prefix="ish-bench-")
    env = helper_env(tmp)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(env["HELPER_SOCKET"])
    listener.listen(8)
    instances: list[subprocess.Popen] = []
    stopping = threading.Event()

    def accept_loop():
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            fd = conn.fileno()
            code = (f"import os, sys; os.dup2({fd}, 3); "
                    "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); "
                    f"os.execv(sys.executable, {ISOLATED!r})")
            instances.append(subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", code], env=env, pass_fds=(fd,),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            conn.close()

    acceptor = threading.Thread(target=accept_loop, daemon=True)
    acceptor.start()
    try:
        def reap():
            instances[-1].wait(timeout=10)   # the instance exits once its action ran
        return round_trips(env["HELPER_SOCKET"], n, after_each=reap)
    finally:
        stopping.set()
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        acceptor.join(timeout=5)
        for proc in instances:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)


def rss_at_rest(argv) -> float:
    tmp = tempfile.mkdtemp(prefix="ish-bench-")
    env = helper_env(tmp)
    helper = Running(argv, env)
    try:
        for i in range(1, 51):
            round_trips(env["HELPER_SOCKET"], 1)
            helper.wait_execs(i)
        time.sleep(1.0)   # at rest: no request in flight
        return psutil.Process(helper.proc.pid).memory_info().rss / 2**20
    finally:
        stop(helper)
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--spawned", type=int, default=200,
                        help="round trips in per-connection (Accept=yes) mode")
    args = parser.parse_args()
    standalone, so = bench_standalone(args.requests)
    spawned, po = bench_per_connection(args.spawned)
    rss_isolated, rss_site = rss_at_rest(ISOLATED), rss_at_rest(WITH_SITE)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    print("```")
    print(f"date:    {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"machine: {' '.join(os.uname())}")
    print(f"cpu:     {cpu} ({os.cpu_count()} CPUs)")
    print(f"python:  {platform.python_version()} ({sys.executable})")
    print(f"command: {os.path.relpath(sys.executable)} {' '.join(sys.argv)}")
    print("```")
    print()
    print("| call_helper round trip (mock backend, grace 0) | n | p50 ms | p99 ms | max ms | outcomes |")
    print("|---|---|---|---|---|---|")
    for name, samples, outcomes in (("standalone helper (one process)", standalone, so),
                                    ("Accept=yes (one instance per request)", spawned, po)):
        p50, p99, worst = percentiles(samples)
        print(f"| {name} | {len(samples)} | {p50:.2f} | {p99:.2f} | {worst:.2f} | {outcomes} |")
    print()
    print("| helper RSS at rest (standalone, after 50 requests) | MiB |")
    print("|---|---|")
    print(f"| `python -I -S` (stdlib only) | {rss_isolated:.1f} |")
    print(f"| `python -m infoscreen.helper` (site enabled, as the console script) | {rss_site:.1f} |")


if __name__ == "__main__":
    main()
