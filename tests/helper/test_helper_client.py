"""`call_helper`, the supervisor's side of the boundary, against the real helper process."""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import tempfile
import time
import uuid

import pytest

from infoscreen.helper import protocol
from infoscreen.supervisor.helper_client import HelperOutcome, _map_answer, decode_response
from tests.helper.helper_support import call_unsigned, run_as_nobody

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")


def new_id() -> str:
    return str(uuid.uuid4())


def test_ok_in_mock_mode(start_helper):
    helper = start_helper()
    outcome = call_unsigned(helper.socket_path, "reboot_host", new_id(), 5.0)
    assert outcome == HelperOutcome(ok=True, mock=True, error_code=None, error_message=None)
    assert dataclasses.is_dataclass(outcome)
    with pytest.raises(dataclasses.FrozenInstanceError):
        outcome.ok = False


def test_helper_not_running_is_unavailable(sockdir):
    missing = call_unsigned(str(sockdir / "nothing.sock"), "reboot_host", new_id(), 2.0)
    assert (missing.ok, missing.error_code) == (False, "helper_unavailable")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sockdir / "stale.sock"))
    stale.close()   # the file exists, nobody listens: ECONNREFUSED
    refused = call_unsigned(str(sockdir / "stale.sock"), "reboot_host", new_id(), 2.0)
    assert refused.error_code == "helper_unavailable"
    assert call_unsigned("/nonexistent-dir/x.sock", "reboot_host", new_id(), 2.0).error_code \
        == "helper_unavailable"


def test_helper_stopped_after_start_is_unavailable(start_helper):
    helper = start_helper()
    helper.stop()   # a clean stop removes its socket
    assert call_unsigned(helper.socket_path, "reboot_host", new_id(), 2.0).error_code \
        == "helper_unavailable"


def test_stalled_helper_times_out_within_the_bound(start_helper):
    helper = start_helper()
    os.kill(helper.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        outcome = call_unsigned(helper.socket_path, "reboot_host", new_id(), 0.5)
        elapsed = time.monotonic() - started
    finally:
        os.kill(helper.proc.pid, signal.SIGCONT)
    assert outcome.error_code == "helper_timeout" and not outcome.ok
    assert 0.45 <= elapsed < 0.75, elapsed


def test_no_time_left_is_a_timeout(start_helper):
    helper = start_helper()
    assert call_unsigned(helper.socket_path, "reboot_host", new_id(), 0).error_code \
        == "helper_timeout"


def test_busy_maps_to_busy(start_helper):
    helper = start_helper(HELPER_GRACE_S=1.5)
    assert call_unsigned(helper.socket_path, "reboot_host", new_id(), 5.0).ok
    second = call_unsigned(helper.socket_path, "shutdown_host", new_id(), 5.0)
    assert (second.ok, second.error_code) == (False, "busy")


def test_rate_limited_maps_to_helper_rejected(start_helper):
    helper = start_helper(HELPER_MAX_ACTIONS_PER_HOUR=1)
    assert call_unsigned(helper.socket_path, "reboot_host", new_id(), 5.0).ok
    helper.wait_audit(event="exec")   # the action ran and released the lock
    outcome = call_unsigned(helper.socket_path, "reboot_host", new_id(), 5.0)
    assert outcome.error_code == "helper_rejected"
    assert outcome.error_message.startswith("rate_limited:")


def test_unknown_action_and_bad_id_map_to_helper_rejected(start_helper):
    helper = start_helper()
    unknown = call_unsigned(helper.socket_path, "format_disk", new_id(), 5.0)
    assert unknown.error_code == "helper_rejected" and "unsupported_action" in unknown.error_message
    bad = call_unsigned(helper.socket_path, "reboot_host", "not-a-uuid", 5.0)
    assert bad.error_code == "helper_rejected" and "bad_request" in bad.error_message


@root_only
def test_refused_peer_maps_to_helper_rejected(start_helper):
    helper = start_helper(HELPER_ALLOWED_GROUPS="0")
    os.chmod(helper.socket_path, 0o666)   # test dir only: let uid 65534 reach the peer check
    result = run_as_nobody(lambda: dataclasses.asdict(
        call_unsigned(helper.socket_path, "reboot_host", new_id(), 5.0)))
    assert result["error_code"] == "helper_rejected"
    assert result["error_message"].startswith("peer_not_allowed:")


CODE_MAP = [
    ("busy", "busy"), ("exec_failed", "execution_failed"), ("exec_timeout", "execution_failed"),
    ("peer_not_allowed", "helper_rejected"), ("rate_limited", "helper_rejected"),
    ("bad_request", "helper_rejected"), ("unsupported_action", "helper_rejected"),
    ("internal_error", "helper_rejected"), ("some_future_code", "helper_rejected"),
    ("signature_invalid", "signature_invalid"), ("replayed", "helper_rejected"),
    ("expired", "helper_rejected"),
]


def test_the_mapping_covers_the_whole_error_table():
    assert set(protocol.ERRORS) <= {code for code, _ in CODE_MAP}


@pytest.mark.parametrize("code,expected", CODE_MAP)
def test_every_helper_code_maps_to_an_ack_code(code, expected):
    # The helper's own encoder and the client's decoder: the mapping table, not a fake helper.
    answer = decode_response(protocol.encode_response(False, new_id(), False, code,
                                                               "exited with status 1"))
    outcome = _map_answer(answer)
    assert (outcome.ok, outcome.error_code) == (False, expected)
    if expected not in ("busy", "signature_invalid"):
        assert outcome.error_message == f"{code}: exited with status 1"


@pytest.mark.parametrize("data", [
    b"", b"garbage", b"[]", b'{"v": 1}', b'{"v": 1, "ok": "yes", "command_id": null, "mock": false,'
    b' "error_code": null, "error_message": null}',
    b'{"v": 1, "ok": false, "command_id": null, "mock": false, "error_code": null,'
    b' "error_message": null}',
    b'{"v": 1, "ok": true, "command_id": null, "mock": false, "error_code": "busy",'
    b' "error_message": null}',
    b"x" * 5000,
])
def test_garbage_answers_are_refused_by_the_decoder(data):
    with pytest.raises(protocol.ProtocolError):
        decode_response(data)


def _fake_helper_as_nobody() -> tuple[int, str, int]:
    """A listener that is not root: a forked child drops to uid/gid 65534, then binds and
    listens (SO_PEERCRED reports the credentials of listen()). It accepts one connection and
    reports, through a pipe, how many bytes it received before the client closed."""
    home = tempfile.mkdtemp(prefix="ish-fake-", dir="/tmp")
    os.chown(home, 65534, 65534)
    path = os.path.join(home, "helper.sock")
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:   # child
        status = 1
        try:
            os.close(ready_r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
                listener.bind(path)
                os.chmod(path, 0o666)
                listener.listen(1)
                listener.settimeout(10)
                os.write(ready_w, b"R")
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(10)
                    received = b""
                    while chunk := conn.recv(4096):
                        received += chunk
                    try:   # an answer the client must never believe (it is gone by now)
                        conn.sendall(protocol.encode_response(True, None, False))
                    except OSError:
                        pass
            os.write(ready_w, b"%d" % len(received))
            status = 0
        finally:
            os._exit(status)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"R"
    return pid, path, ready_r


@root_only
def test_a_helper_socket_served_by_a_non_root_process_is_refused():
    pid, path, report = _fake_helper_as_nobody()
    try:
        outcome = call_unsigned(path, "reboot_host", new_id(), 5.0)
    finally:
        with os.fdopen(report, "rb") as pipe:
            received = pipe.read()
        _, status = os.waitpid(pid, 0)
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    assert (outcome.ok, outcome.error_code) == (False, "helper_unavailable")
    assert "uid 65534" in outcome.error_message and "not root" in outcome.error_message
    assert os.waitstatus_to_exitcode(status) == 0
    assert received == b"0"   # the client sent nothing: not even the command_id leaked


def test_the_real_helper_passes_the_peer_check(start_helper):
    helper = start_helper()
    assert os.stat(helper.socket_path).st_uid == os.geteuid()   # the helper runs as we do
    assert call_unsigned(helper.socket_path, "reboot_host", new_id(), 5.0).ok


def test_full_backlog_is_unavailable_at_once(sockdir):
    """AF_UNIX never waits in connect(): a listener with a full backlog fails with EAGAIN,
    which is helper_unavailable, not helper_timeout."""
    path = str(sockdir / "busy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    fillers = []
    try:
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            fillers.append(sock)
            try:
                sock.connect(path)
            except BlockingIOError:
                break
            assert len(fillers) < 100
        started = time.monotonic()
        outcome = call_unsigned(path, "reboot_host", new_id(), 2.0)
        assert time.monotonic() - started < 0.5
        assert outcome.error_code == "helper_unavailable", outcome
    finally:
        for sock in fillers:
            sock.close()
        listener.close()
