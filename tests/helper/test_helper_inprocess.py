"""The helper's functions called in this process, where a process test cannot look: the call
the REAL execution backend makes (subprocess.run replaced by a recorder, so nothing runs), a
signal during the action, a thread that cannot start, the configuration bounds.

Safety: every test that reaches the real backend replaces subprocess.run first; the recorder
never runs anything, so no test here can reboot the machine it runs on.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid

import pytest

from infoscreen.helper import server
from tests.helper.helper_support import request

SYSTEMCTL = "/usr/bin/systemctl"


class Recorder:
    """Stands in for subprocess.run: records each call, runs nothing."""

    def __init__(self, on_call=None):
        self.calls, self.on_call = [], on_call

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.on_call:
            self.on_call(args[0])
        return subprocess.CompletedProcess(args[0], 0)


@pytest.fixture
def audits(monkeypatch):
    lines: list[dict] = []
    monkeypatch.setattr(server, "audit", lambda **fields: lines.append(json.loads(json.dumps(fields))))
    return lines


@pytest.fixture
def production_cfg(tmp_path):
    """The configuration of a device: production, mock off, the real backend."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    key = tmp_path / "command.key"
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o600)
    cfg = server.load_config({"HELPER_STATE_DIR": str(state), "HELPER_ALLOWED_GROUPS": "0", "HELPER_GRACE_S": "0",
                              "HELPER_COMMAND_KEY_FILE": str(key)})
    assert cfg.mode == "production" and cfg.mock is False and cfg.key == b"\xab" * 32
    return cfg


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(subprocess, "run", rec)
    assert server.subprocess.run is rec  # the helper looks it up at call time: nothing real runs
    return rec


def test_real_backend_gets_list_argv_no_shell_empty_env(production_cfg, recorder, audits):
    run_later = server._schedule("reboot_host", str(uuid.uuid4()), time.time() + 600, production_cfg)
    assert len(recorder.calls) == 1  # the pre-flight, before the answer
    run_later()
    assert len(recorder.calls) == 2
    expected = [([SYSTEMCTL, "--dry-run", "reboot"], server.DRY_RUN_TIMEOUT_S), ([SYSTEMCTL, "reboot"], 30.0)]
    for (args, kwargs), (argv, timeout) in zip(recorder.calls, expected, strict=True):
        assert len(args) == 1 and type(args[0]) is list and args[0] == argv
        assert kwargs["shell"] is False and kwargs["env"] == {} and kwargs["close_fds"] is True
        assert kwargs["cwd"] == "/" and kwargs["timeout"] == timeout
        assert kwargs["stdin"] == subprocess.DEVNULL and kwargs["stdout"] == subprocess.DEVNULL
        assert set(kwargs) == {"shell", "env", "close_fds", "cwd", "timeout", "stdin", "stdout"}
    [done] = [a for a in audits if a["event"] == "exec"]
    assert done["outcome"] == "ok" and done["argv"] == [SYSTEMCTL, "reboot"]


def test_preflight_bound_fits_in_the_client_timeout():
    # The supervisor waits HELPER_TIMEOUT_S (5 s by default): exec_timeout must reach it.
    assert server.DRY_RUN_TIMEOUT_S <= 3.0


def test_sigterm_during_the_action_is_audited(production_cfg, monkeypatch, audits):
    """What a real reboot does: systemd stops the instance while `systemctl reboot` runs."""

    def sigterm_during_reboot(argv):
        if "--dry-run" not in argv:
            server._on_signal(signal.SIGTERM, None)  # the helper's own handler raises here

    monkeypatch.setattr(subprocess, "run", Recorder(sigterm_during_reboot))
    run_later = server._schedule("shutdown_host", str(uuid.uuid4()), time.time() + 600, production_cfg)
    with pytest.raises(SystemExit) as stopped:
        run_later()
    assert stopped.value.code == 0  # a clean exit for systemd
    [line] = [a for a in audits if a["event"] == "exec"]
    assert line["outcome"] == "interrupted: SIGTERM during the action"
    assert line["argv"] == [SYSTEMCTL, "poweroff"] and "duration_ms" in line
    lock = server._try_lock(production_cfg.state_dir)  # released on the way out
    assert lock is not None
    os.close(lock)


def test_breaker_state_not_rewritten_is_audited(production_cfg, recorder, audits, monkeypatch):
    run_later = server._schedule("reboot_host", str(uuid.uuid4()), time.time() + 600, production_cfg)

    def no_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(server, "_save_state", no_disk)
    run_later(cancel=True)
    [line] = [a for a in audits if a["event"] == "exec"]
    assert line["outcome"] == "cancelled: answer not delivered; breaker state not rewritten: OSError"
    assert len(recorder.calls) == 1  # the pre-flight only: nothing executed


class _Stop(BaseException):
    pass


class Listener:
    """accept() hands out prepared connections, then ends serve()."""

    def __init__(self, conns):
        self.conns = list(conns)

    def accept(self):
        if not self.conns:
            raise _Stop
        return self.conns.pop(0), None


def test_thread_start_failure_closes_the_connection_and_keeps_serving(tmp_path, monkeypatch, audits):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    cfg = server.load_config(
        {
            "HELPER_STATE_DIR": str(state),
            "HELPER_ALLOWED_GROUPS": str(os.getgid()),
            "HELPER_GRACE_S": "0",
            "INFOSCREEN_ENV": "test",
            "COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE": "1",
        }
    )
    # The bound counts this process's threads: leave room for whatever pytest runs besides.
    monkeypatch.setattr(server, "MAX_WORKERS", threading.active_count() + 16)
    pairs = [socket.socketpair() for _ in range(18)]

    def cannot_start(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", cannot_start)
    with pytest.raises(_Stop):
        server.serve(Listener(theirs for _, theirs in pairs), cfg)
    for ours, _ in pairs:
        ours.settimeout(5)
        assert ours.recv(100) == b""  # closed, not left hanging
        ours.close()
    closed = [a for a in audits if a["event"] == "overload_closed"]
    assert [a["detail"] for a in closed] == ["can't start new thread"] * len(pairs)
    # Nothing leaked: once threads start again, the next connection is served.
    monkeypatch.undo()
    monkeypatch.setattr(server, "audit", lambda **fields: audits.append(fields))
    monkeypatch.setattr(server, "MAX_WORKERS", threading.active_count() + 16)
    ours, theirs = socket.socketpair()
    with pytest.raises(_Stop):
        server.serve(Listener([theirs]), cfg)
    with ours:
        ours.settimeout(5)
        ours.sendall(request())
        ours.shutdown(socket.SHUT_WR)
        assert json.loads(ours.recv(4096))["ok"] is True
    deadline = time.monotonic() + 10   # let the handler thread finish its (mock) action here
    while not any(a["event"] == "exec" for a in audits):
        assert time.monotonic() < deadline, audits
        time.sleep(0.01)


@pytest.mark.parametrize(
    "env,ok",
    [
        ({"HELPER_MAX_ACTIONS_PER_HOUR": "100"}, True),
        ({"HELPER_MAX_ACTIONS_PER_HOUR": "101"}, False),  # production: a breaker, not a quota
        ({"HELPER_MAX_ACTIONS_PER_HOUR": "100000", "INFOSCREEN_ENV": "test"}, True),  # test harnesses
        ({"HELPER_MAX_ACTIONS_PER_HOUR": "100001", "INFOSCREEN_ENV": "test"}, False),
    ],
)
def test_breaker_limit_bounds(env, ok):
    env = {"HELPER_ALLOWED_GROUPS": "0", "HELPER_ALLOW_UNSIGNED": "1", **env}
    if ok:
        assert server.load_config(env).limit == int(env["HELPER_MAX_ACTIONS_PER_HOUR"])
    else:
        with pytest.raises(server.ConfigError, match="HELPER_MAX_ACTIONS_PER_HOUR"):
            server.load_config(env)


def test_a_full_breaker_at_the_largest_limit_is_still_readable(tmp_path, audits):
    """A corrupt state at the largest allowed limit is rewritten as a full breaker that the
    next read can parse (it once exceeded the read bound and locked the helper out for good)."""
    (tmp_path / "actions.json").write_text("{half a fi")
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert len(server._load_state(dfd, 100000)["ts"]) == 100000
        assert len(server._load_state(dfd, 100000)["ts"]) == 100000
    finally:
        os.close(dfd)
    assert [a["event"] for a in audits] == ["state_corrupt"]  # once, then healed


def test_audit_never_raises(monkeypatch):
    def broken(fd, data):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(os, "write", broken)
    server.audit(event="request", outcome="ok")  # no exception
