"""The helper process over its real socket: peers, frames, deadlines, busy, breaker, start-up."""
from __future__ import annotations

import ast
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

import pytest

from tests.helper.helper_support import (DISPATCH, DRY_RUN, HELPER_ARGV, REPO, exchange,
                                         request, run_as_nobody, run_refused)

HELPER_FILES = [REPO / "infoscreen/helper/server.py", REPO / "infoscreen/helper/protocol.py",
                REPO / "infoscreen/helper/__main__.py", REPO / "infoscreen/helper/__init__.py"]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")


# ---------------------------------------------------------------- size and imports
def test_helper_is_stdlib_only_and_small():
    # `infoscreen` itself holds only the version and imports nothing (tests/wire/test_vocabulary.py).
    allowed_local = {"infoscreen.helper.protocol", "infoscreen.helper.server", "infoscreen.helper", "infoscreen"}
    for path in HELPER_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module] if node.level == 0 else ["<relative>"]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or name in allowed_local, (path, name)
    # Non-blank lines, comments and docstrings included: what a reviewer reads.
    lines = sum(1 for path in HELPER_FILES for line in path.read_text().splitlines() if line.strip())
    assert lines < 450, lines


def test_serves_allowed_peer_under_isolated_interpreter(start_helper):
    helper = start_helper()
    assert helper.proc.args[:3] == [sys.executable, "-I", "-S"]
    assert oct(os.stat(helper.socket_path).st_mode & 0o777) == "0o660"
    cid = str(uuid.uuid4())
    answer = exchange(helper.socket_path, request("shutdown_host", cid))
    assert answer == {"v": 2, "ok": True, "command_id": cid, "mock": True,
                      "error_code": None, "error_message": None}
    execs = helper.wait_audit(count=2, event="mock_exec")
    # The backend got exactly the fixed argv, an empty environment, no shell.
    assert [e["argv"] for e in execs] == [DRY_RUN["shutdown_host"], DISPATCH["shutdown_host"]]
    assert all(e["env"] == {} and e["shell"] is False for e in execs)
    [line] = helper.wait_audit(event="request", command_id=cid)
    assert line["outcome"] == "ok" and line["action"] == "shutdown_host"
    assert (line["peer_pid"], line["peer_uid"], line["peer_gid"]) == (os.getpid(), os.getuid(),
                                                                      os.getgid())
    assert isinstance(line["duration_ms"], float)
    [done] = helper.wait_audit(event="exec", command_id=cid)
    assert done["outcome"] == "ok" and done["argv"] == DISPATCH["shutdown_host"]


# ---------------------------------------------------------------- peers
def _as_nobody(path: str) -> dict:
    return run_as_nobody(lambda: exchange(path, request()))


@root_only
@pytest.mark.parametrize("users,groups,allowed", [
    ("", "0", False),          # neither uid nor gid listed: refused
    ("65534", "0", True),      # listed by uid
    ("", "0,65534", True),     # listed by (primary) gid
])
def test_peer_allow_list(start_helper, users, groups, allowed):
    helper = start_helper(HELPER_ALLOWED_USERS=users, HELPER_ALLOWED_GROUPS=groups)
    os.chmod(helper.socket_path, 0o666)   # test dir only: let uid 65534 reach the check
    answer = _as_nobody(helper.socket_path)
    [line] = helper.wait_audit(event="request", peer_uid=65534)
    assert line["peer_gid"] == 65534
    if allowed:
        assert answer["ok"] is True and line["outcome"] == "ok"
    else:
        assert answer["ok"] is False and answer["error_code"] == "peer_not_allowed"
        assert line["outcome"] == "peer_not_allowed"
        assert helper.audits(event="mock_exec") == []


# ---------------------------------------------------------------- frames
CID = str(uuid.uuid4())
BAD_FRAMES = {
    "oversize": b'{"v": 1, "pad": "' + b"x" * 5000 + b'"}',
    "truncated": request(command_id=CID)[:20],
    "non_json": b"reboot please",
    "empty": b"",
    "not_utf8": b'{"v": 1, "action": "reboot_host", "command_id": "\xff"}',
    "array": b"[1, 2, 3]",
    "v_string": json.dumps({"v": "1", "action": "reboot_host", "command_id": CID}).encode(),
    "v_bool": json.dumps({"v": True, "action": "reboot_host", "command_id": CID}).encode(),
    "v_2": json.dumps({"v": 2, "action": "reboot_host", "command_id": CID}).encode(),
    "action_int": json.dumps({"v": 1, "action": 5, "command_id": CID}).encode(),
    "cid_int": json.dumps({"v": 1, "action": "reboot_host", "command_id": 5}).encode(),
    "cid_not_uuid": request(command_id="not-a-uuid-but-36-characters-long!!!"),
    "unknown_field": request(command_id=CID, reason="x"),
    "missing_field": json.dumps({"v": 1, "action": "reboot_host"}).encode(),
    "duplicate_key": b'{"v": 1, "v": 1, "action": "reboot_host", "command_id": "%s"}' % CID.encode(),
    "nan": b'{"v": NaN, "action": "reboot_host", "command_id": "%s"}' % CID.encode(),
    "deep": b"[" * 3000 + b"]" * 3000,
}


def test_malformed_frames_are_bad_request_and_helper_keeps_serving(start_helper):
    helper = start_helper()
    for name, frame in BAD_FRAMES.items():
        answer = exchange(helper.socket_path, frame)
        assert answer is not None, name
        assert (answer["ok"], answer["error_code"]) == (False, "bad_request"), (name, answer)
        assert answer["mock"] is True and set(answer) == {"v", "ok", "command_id", "mock",
                                                          "error_code", "error_message"}
    answer = exchange(helper.socket_path, request("format_disk", CID))
    assert (answer["error_code"], answer["command_id"]) == ("unsupported_action", CID)
    assert helper.audits(event="mock_exec") == []          # nothing was ever executed
    assert len(helper.audits(event="request", outcome="bad_request")) == len(BAD_FRAMES)
    assert exchange(helper.socket_path, request())["ok"] is True
    assert helper.proc.poll() is None


def test_silent_client_is_cut_off_while_others_are_served(start_helper):
    helper = start_helper(HELPER_READ_TIMEOUT_S=0.5)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        silent.settimeout(5)
        silent.connect(helper.socket_path)
        started = time.monotonic()
        # While the silent client holds its connection, another one is served at once.
        assert exchange(helper.socket_path, request(), timeout=0.4)["ok"] is True
        data = silent.recv(4096)   # the helper answers the silent one at its deadline
        elapsed = time.monotonic() - started
        assert json.loads(data)["error_code"] == "bad_request"
        assert 0.3 <= elapsed < 2.0, elapsed
        assert silent.recv(4096) == b""   # and closes it
    finally:
        silent.close()
    helper.wait_audit(event="exec")
    assert exchange(helper.socket_path, request())["ok"] is True


# ---------------------------------------------------------------- one at a time, breaker
def test_concurrent_power_requests_give_exactly_one_busy(start_helper):
    helper = start_helper(HELPER_GRACE_S=1.5)
    answers, barrier = [], threading.Barrier(2)

    def go():
        barrier.wait(timeout=5)
        answers.append(exchange(helper.socket_path, request()))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    codes = sorted(str(a["error_code"]) for a in answers)
    assert codes == ["None", "busy"], answers
    # After the first action ran (grace elapsed), the lock is free again.
    helper.wait_audit(event="exec", timeout=10)
    assert exchange(helper.socket_path, request())["ok"] is True


def test_breaker_limits_per_hour_and_survives_restart(start_helper, helper_env):
    helper = start_helper(HELPER_MAX_ACTIONS_PER_HOUR=2)
    for n in (1, 2):   # one at a time: each action runs and releases the lock
        assert exchange(helper.socket_path, request())["ok"] is True
        helper.wait_audit(count=n, event="exec")
    third = exchange(helper.socket_path, request())
    assert third["error_code"] == "rate_limited" and "limit 2" in third["error_message"]
    helper.stop()
    state = json.loads((Path(helper_env["HELPER_STATE_DIR"]) / "actions.json").read_text())
    assert len(state["ts"]) == 2 and all(abs(t - time.time()) < 60 for t in state["ts"])
    again = start_helper(HELPER_MAX_ACTIONS_PER_HOUR=2)   # "after a reboot": same state dir
    assert exchange(again.socket_path, request())["error_code"] == "rate_limited"
    assert len(again.audits(event="mock_exec")) == 0


def test_breaker_state_corrupt_or_from_the_future_fails_closed(start_helper, helper_env):
    state_dir = Path(helper_env["HELPER_STATE_DIR"])
    state_dir.mkdir(mode=0o700)
    (state_dir / "actions.json").write_text("{half a fi")
    helper = start_helper(HELPER_MAX_ACTIONS_PER_HOUR=1)
    assert exchange(helper.socket_path, request())["error_code"] == "rate_limited"
    helper.wait_audit(event="state_corrupt")
    # Rewritten as a full breaker from now: it heals after an hour instead of staying shut.
    [ts] = json.loads((state_dir / "actions.json").read_text())["ts"]
    assert abs(ts - time.time()) < 60
    assert exchange(helper.socket_path, request())["error_code"] == "rate_limited"
    assert len(helper.audits(event="state_corrupt")) == 1
    # Clock went back: a timestamp a day in the future is clamped to now and still counts.
    (state_dir / "actions.json").write_text(json.dumps({"v": 1, "ts": [time.time() + 86400]}))
    assert exchange(helper.socket_path, request())["error_code"] == "rate_limited"
    [ts] = json.loads((state_dir / "actions.json").read_text())["ts"]
    assert ts <= time.time()


def test_zero_limit_refuses_everything(start_helper):
    helper = start_helper(HELPER_MAX_ACTIONS_PER_HOUR=0)
    assert exchange(helper.socket_path, request())["error_code"] == "rate_limited"


# ---------------------------------------------------------------- start-up refusals
def _one_line(proc: subprocess.CompletedProcess, needle: str):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert lines[0].startswith("infoscreen-helper: refusing to start:")


def test_mock_refused_under_production(helper_env):
    proc = run_refused({**helper_env, "INFOSCREEN_ENV": "production"})
    _one_line(proc, "COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE")
    assert not os.path.exists(helper_env["HELPER_SOCKET"])
    env = {k: v for k, v in helper_env.items() if k != "INFOSCREEN_ENV"}   # default: production
    _one_line(run_refused(env), "INFOSCREEN_ENV=production")


def test_console_script_refuses_mock_under_production(helper_env):
    script = Path(sys.executable).parent / "infoscreen-helper"
    if not script.exists():
        pytest.skip("console script not installed in this environment")
    proc = subprocess.run([str(script)], env={**helper_env, "INFOSCREEN_ENV": "production"},
                          capture_output=True, text=True, timeout=10)
    _one_line(proc, "COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE")


@pytest.mark.parametrize("name,value", [
    ("HELPER_GRACE_S", "soon"), ("HELPER_GRACE_S", "-1"), ("HELPER_GRACE_S", "nan"),
    ("HELPER_MAX_ACTIONS_PER_HOUR", "3.5"), ("HELPER_READ_TIMEOUT_S", "0"),
    ("HELPER_ALLOWED_GROUPS", "no-such-group-xyz"), ("HELPER_ALLOWED_USERS", "no-such-user-xyz"),
    ("INFOSCREEN_ENV", "staging"), ("COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE", "maybe"),
    ("HELPER_SOCKET", "relative.sock"), ("HELPER_STATE_DIR", "state"),
])
def test_bad_configuration_is_one_line_naming_the_variable(helper_env, name, value):
    _one_line(run_refused({**helper_env, name: value}), name)


def test_symlink_at_socket_path_is_refused(helper_env, sockdir):
    target = sockdir / "target"
    target.write_text("precious")
    os.symlink(target, helper_env["HELPER_SOCKET"])
    _one_line(run_refused(helper_env), "HELPER_SOCKET")
    assert os.path.islink(helper_env["HELPER_SOCKET"]) and target.read_text() == "precious"


def test_regular_file_at_socket_path_is_refused(helper_env):
    Path(helper_env["HELPER_SOCKET"]).write_text("x")
    _one_line(run_refused(helper_env), "not a socket")


def test_directory_writable_by_others_is_refused(helper_env, sockdir):
    os.chmod(sockdir, 0o777)
    _one_line(run_refused(helper_env), "not group/other-writable")


@pytest.mark.parametrize("mode,owner", [(0o775, None), (0o755, 65534)])
def test_socket_directory_only_we_can_write(helper_env, sockdir, mode, owner):
    """Whoever can write the socket's directory can swap the socket: not its group, not
    another owner (as root: only root)."""
    if owner is not None and os.geteuid() != 0:
        pytest.skip("needs root to hand the directory to another uid")
    os.chmod(sockdir, mode)
    if owner is not None:
        os.chown(sockdir, owner, -1)
    _one_line(run_refused(helper_env), "HELPER_SOCKET")
    assert not os.path.exists(helper_env["HELPER_SOCKET"])


def test_stale_socket_is_replaced_and_live_one_is_not(start_helper, helper_env):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(helper_env["HELPER_SOCKET"])
    stale.close()   # a dead helper's leftover: nobody listens
    helper = start_helper()
    assert exchange(helper.socket_path, request())["ok"] is True
    helper.wait_audit(event="exec")
    _one_line(run_refused(helper_env), "served by another process")
    assert exchange(helper.socket_path, request())["ok"] is True


# ---------------------------------------------------------------- socket activation
def _activation_argv(fd: int) -> list[str]:
    """A launcher that puts `fd` on fd 3 and sets LISTEN_PID to its own pid, then execs the
    helper: after exec the pid is the helper's, as systemd would have it."""
    code = (f"import os, sys; os.dup2({fd}, 3); fd != 3 and os.close({fd}); "
            "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); "
            f"os.execv(sys.executable, {HELPER_ARGV!r})").replace("fd != 3", f"{fd} != 3")
    return [sys.executable, "-I", "-S", "-c", code]


def test_socket_activation_listening_socket(start_helper, sockdir):
    path = str(sockdir / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    try:
        helper = start_helper(argv=_activation_argv(listener.fileno()),
                              pass_fds=(listener.fileno(),))
        [start] = helper.audits(event="start")
        assert start["socket"] == "(activated)" and start["listening"] is True
        assert start["pid"] == helper.proc.pid
        assert not os.path.exists(helper.socket_path)   # it did not bind a path of its own
        assert exchange(path, request())["ok"] is True
        assert exchange(path, b"junk")["error_code"] == "bad_request"
    finally:
        listener.close()


def test_socket_activation_accept_yes_single_connection(start_helper):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        helper = start_helper(argv=_activation_argv(theirs.fileno()), pass_fds=(theirs.fileno(),))
        theirs.close()
        cid = str(uuid.uuid4())
        ours.settimeout(5)
        ours.sendall(request(command_id=cid))
        ours.shutdown(socket.SHUT_WR)
        answer = json.loads(ours.recv(4096))
        assert answer["ok"] is True and answer["command_id"] == cid
        assert helper.proc.wait(timeout=10) == 0   # one connection, one instance, then exit
        assert len(helper.audits(event="mock_exec")) == 2
    finally:
        ours.close()
        theirs.close()


def test_activation_with_wrong_fd_count_is_refused(helper_env):
    code = ("import os, sys; os.environ.update(LISTEN_FDS='2', LISTEN_PID=str(os.getpid())); "
            f"os.execv(sys.executable, {HELPER_ARGV!r})")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], env=helper_env,
                          capture_output=True, text=True, timeout=10)
    _one_line(proc, "LISTEN_FDS")


def test_stale_socket_probe_does_not_hang_on_a_full_backlog(helper_env):
    """A live listener whose backlog is full is not stale: refused at once, never unlinked."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(helper_env["HELPER_SOCKET"])
    listener.listen(0)
    fillers = []
    try:
        while True:   # fill the backlog until a non-blocking connect would have to wait
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            fillers.append(sock)
            try:
                sock.connect(helper_env["HELPER_SOCKET"])
            except BlockingIOError:
                break
            assert len(fillers) < 100
        started = time.monotonic()
        _one_line(run_refused(helper_env, timeout=10), "served by another process")
        assert time.monotonic() - started < 5
        assert os.path.exists(helper_env["HELPER_SOCKET"])
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


# ---------------------------------------------------------------- the breaker counts only actions
def _send_and_vanish(helper, frame: bytes):
    """A client that sends a request and closes without reading the answer. The helper is
    stopped meanwhile, so it can only answer once the client is gone: deterministic."""
    os.kill(helper.proc.pid, signal.SIGSTOP)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(helper.socket_path)
            sock.sendall(frame)
    finally:
        os.kill(helper.proc.pid, signal.SIGCONT)


def test_undelivered_answers_leave_no_timestamp_in_the_breaker(start_helper, helper_env):
    helper = start_helper(HELPER_MAX_ACTIONS_PER_HOUR=3)
    for n in (1, 2, 3):
        _send_and_vanish(helper, request())
        [*_, line] = helper.wait_audit(count=n, event="exec")
        assert line["outcome"] == "cancelled: answer not delivered"
    requests = helper.wait_audit(count=3, event="request")
    assert [r.get("answer_delivered") for r in requests] == [False] * 3
    assert [r["outcome"] for r in requests] == ["ok"] * 3   # scheduled, then cancelled
    state = Path(helper_env["HELPER_STATE_DIR"]) / "actions.json"
    assert json.loads(state.read_text())["ts"] == []
    # Nothing ran, so nothing counts: a fourth request is served, not rate_limited.
    cid = str(uuid.uuid4())
    assert exchange(helper.socket_path, request(command_id=cid))["ok"] is True
    [done] = helper.wait_audit(event="exec", command_id=cid)
    assert done["outcome"] == "ok"
    assert len(json.loads(state.read_text())["ts"]) == 1
    # Only the fourth was executed: pre-flights for all four, one real argv.
    argvs = [e["argv"] for e in helper.audits(event="mock_exec")]
    assert argvs.count(DISPATCH["reboot_host"]) == 1 and argvs.count(DRY_RUN["reboot_host"]) == 4


# ---------------------------------------------------------------- Accept=yes instances
def _instance(start_helper, **env):
    """One socket-activated instance (Accept=yes): its connection is fd 3, LISTEN_FDS=1."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    helper = start_helper(argv=_activation_argv(theirs.fileno()), pass_fds=(theirs.fileno(),),
                          **env)
    theirs.close()
    ours.settimeout(5)
    return helper, ours


def _ask(sock: socket.socket, frame: bytes) -> dict:
    with sock:
        sock.sendall(frame)
        sock.shutdown(socket.SHUT_WR)
        return json.loads(sock.recv(4096))


def test_busy_across_two_socket_activated_instances(start_helper):
    first, sock1 = _instance(start_helper, HELPER_GRACE_S=1.5)
    second, sock2 = _instance(start_helper, HELPER_GRACE_S=1.5)
    assert _ask(sock1, request())["ok"] is True   # holds the lock through its grace period
    answer = _ask(sock2, request())
    assert (answer["ok"], answer["error_code"]) == (False, "busy")
    assert second.proc.wait(timeout=10) == 0
    assert first.proc.wait(timeout=10) == 0
    assert first.wait_audit(event="exec")[0]["outcome"] == "ok"
    assert second.audits(event="exec") == []


def test_sigterm_during_grace_is_audited_as_interrupted(start_helper):
    helper, sock = _instance(start_helper, HELPER_GRACE_S=30)
    assert _ask(sock, request())["ok"] is True
    helper.wait_audit(event="request")
    helper.proc.terminate()
    assert helper.proc.wait(timeout=10) == 0
    [line] = helper.wait_audit(event="exec")
    assert line["outcome"] == "interrupted: SIGTERM before the action"
    assert [e["argv"][1] for e in helper.audits(event="mock_exec")] == ["--dry-run"]


def test_a_broken_stderr_does_not_cost_the_action(helper_env):
    """audit() never raises: with stderr a pipe nobody reads, the helper still answers, runs
    the action it scheduled (its timestamp stays) and exits cleanly."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    read_end, write_end = os.pipe()
    os.close(read_end)   # every write to stderr now fails with EPIPE
    try:
        proc = subprocess.Popen(_activation_argv(theirs.fileno()), env=helper_env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=write_end, pass_fds=(theirs.fileno(),))
    finally:
        os.close(write_end)
        theirs.close()
    ours.settimeout(5)
    try:
        assert _ask(ours, request())["ok"] is True
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    state = json.loads((Path(helper_env["HELPER_STATE_DIR"]) / "actions.json").read_text())
    assert len(state["ts"]) == 1
