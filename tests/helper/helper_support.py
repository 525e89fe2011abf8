"""Shared helpers of the helper tests: a real helper process, raw frames, audit parsing.

The helper always runs as `python -I -S -c ...` with only the repository on sys.path: an
interpreter that cannot see site-packages, so every test also proves it is stdlib-only.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAUNCH = (f"import sys; sys.path.insert(0, {str(REPO)!r}); "
          "from infoscreen.helper.server import main; main()")
HELPER_ARGV = [sys.executable, "-I", "-S", "-c", LAUNCH]
AUDIT_PREFIX = "infoscreen-helper audit "
DISPATCH = {"reboot_host": ["/usr/bin/systemctl", "reboot"],
            "shutdown_host": ["/usr/bin/systemctl", "poweroff"]}
DRY_RUN = {"reboot_host": ["/usr/bin/systemctl", "--dry-run", "reboot"],
           "shutdown_host": ["/usr/bin/systemctl", "--dry-run", "poweroff"]}


class Helper:
    """A running helper process whose stderr (the audit trail) is collected line by line."""

    def __init__(self, env: dict, argv=None, pass_fds=()):
        self.env, self.lines, self.eof = env, [], False
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(argv or HELPER_ARGV, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, pass_fds=pass_fds)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    @property
    def socket_path(self) -> str:
        return self.env["HELPER_SOCKET"]

    def _read(self):
        for line in self.proc.stderr:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def audits(self, **match) -> list[dict]:
        with self.cond:
            lines = list(self.lines)
        out = [json.loads(line[len(AUDIT_PREFIX):]) for line in lines
               if line.startswith(AUDIT_PREFIX)]
        return [a for a in out if all(a.get(k) == v for k, v in match.items())]

    def wait_audit(self, count=1, timeout=10.0, **match) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = self.audits(**match)
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.eof:
                    raise AssertionError(f"no {count} audit line(s) {match} within {timeout}s; "
                                         f"stderr so far: {self.lines[-20:]}")
                self.cond.wait(remaining)

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)   # in case a test stopped it
                self.proc.terminate()
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.reader.join(timeout=5)
        self.proc.stderr.close()


def run_refused(env: dict, timeout=10.0) -> subprocess.CompletedProcess:
    """Run a helper expected to refuse to start; returns the finished process."""
    return subprocess.run(HELPER_ARGV, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


def exchange(path: str, payload: bytes, timeout=5.0, half_close=True) -> dict | None:
    """Send one raw frame; return the decoded answer, or None if the helper just closed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        try:
            sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass   # the helper may stop reading early (oversize): its answer is still queued
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    return json.loads(data) if data else None


def request(action="reboot_host", command_id=None, payload=None, signature=None, **extra) -> bytes:
    """A helper request frame; the command payload is made to match unless given."""
    import base64
    command_id = command_id or str(uuid.uuid4())
    if payload is None:
        payload = command_payload(action if isinstance(action, str) else "reboot_host",
                                  command_id if isinstance(command_id, str) else None)
    body = {"v": 2, "action": action, "command_id": command_id,
            "payload": base64.b64encode(payload).decode(), "signature": signature, **extra}
    return json.dumps(body).encode()


def run_as_nobody(fn):
    """Run fn() in a forked child that dropped to uid/gid 65534 with no supplementary groups;
    return its JSON-serialisable result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:   # child: drop privileges for good, then call fn
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, json.dumps(fn()).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:   # EOF when the child exits
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(data)


def command_payload(action="reboot_host", command_id=None, expires_in=600.0, **extra) -> bytes:
    """A command's MQTT payload as the server publishes it (what the helper reads, and verifies
    when it has a key)."""
    from datetime import datetime, timedelta, timezone
    expires = datetime.now(timezone.utc) + timedelta(seconds=expires_in)
    body = {"schema_version": "1.0", "command_id": command_id or str(uuid.uuid4()), "action": action,
            "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%SZ"), **extra}
    return json.dumps(body).encode()


def call_unsigned(path, action, command_id, timeout_s, **kw):
    """call_helper with the command's payload made here, unsigned unless signature= is given."""
    from infoscreen.supervisor.helper_client import call_helper
    payload = kw.pop("payload", None) or command_payload(action, command_id)
    return call_helper(path, action, command_id, timeout_s, payload, kw.pop("signature", None))
