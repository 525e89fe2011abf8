"""Signed power commands at the helper, the one place that decides whether a command is authentic:
a real helper process on a real socket with a real key file (docs/security.md, threat table)."""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

from infoscreen.helper import protocol, server
from infoscreen.wire import ids, signing
from tests.helper.helper_support import command_payload, exchange, request, run_as_nobody, run_refused

KEY = bytes(range(32))
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")


@pytest.fixture
def key_file(sockdir):
    path = sockdir / "command.key"
    path.write_text(signing.key_text(KEY))
    path.chmod(0o600)
    return path


@pytest.fixture
def keyed(start_helper, key_file):
    def start(**env):
        return start_helper(HELPER_COMMAND_KEY_FILE=key_file, **env)
    return start


def signed(action="reboot_host", command_id=None, key=KEY, **payload_extra) -> bytes:
    command_id = command_id or str(uuid.uuid4())
    payload = command_payload(action, command_id, **payload_extra)
    return request(action, command_id, payload=payload, signature=signing.sign(key, payload))


def test_a_signed_command_runs_and_says_so(keyed):
    helper = keyed()
    assert helper.wait_audit(event="start")[0]["command_auth"] == "signed"
    cid = str(uuid.uuid4())
    answer = exchange(helper.socket_path, signed("shutdown_host", cid))
    assert answer["ok"] is True and answer["command_id"] == cid
    [line] = helper.wait_audit(event="request", command_id=cid)
    assert line["outcome"] == "ok" and line["signed"] is True


@pytest.mark.parametrize("how", ["missing", "wrong_key", "other_bytes", "malformed", "upper_case",
                                 "not_ascii"])
def test_missing_or_wrong_signatures_never_run(keyed, how):
    helper = keyed()
    cid = str(uuid.uuid4())
    payload = command_payload("reboot_host", cid)
    sig = {
        "missing": None,
        "wrong_key": signing.sign(b"\x01" * 32, payload),
        "other_bytes": signing.sign(KEY, payload + b" "),   # re-serialised JSON is other bytes
        "malformed": "hmac-sha256=xyz",
        "upper_case": signing.sign(KEY, payload).upper(),
        "not_ascii": "hmac-sha256=" + "é" * 64,
    }[how]
    answer = exchange(helper.socket_path, request("reboot_host", cid, payload=payload, signature=sig))
    assert (answer["ok"], answer["error_code"]) == (False, "signature_invalid")
    assert helper.audits(event="mock_exec") == []


def test_failed_verification_costs_the_breaker_nothing(keyed):
    """The attack: three direct unsigned requests on the helper's socket used up the reboot-loop
    breaker, and the server's own reboot was then refused rate_limited."""
    helper = keyed(HELPER_MAX_ACTIONS_PER_HOUR=1)
    for _ in range(3):
        assert exchange(helper.socket_path, request())["error_code"] == "signature_invalid"
        assert exchange(helper.socket_path, signed(key=b"\x02" * 32))["error_code"] == "signature_invalid"
    assert exchange(helper.socket_path, signed())["ok"] is True   # the server's reboot
    helper.wait_audit(event="exec")
    assert exchange(helper.socket_path, signed())["error_code"] == "rate_limited"


def test_a_replay_never_runs_even_after_a_restart(keyed):
    helper = keyed()
    frame = signed("reboot_host")
    cid = json.loads(frame)["command_id"]
    assert exchange(helper.socket_path, frame)["ok"] is True
    helper.wait_audit(event="exec")
    again = exchange(helper.socket_path, frame)
    assert (again["ok"], again["error_code"]) == (False, "replayed")
    # The same command id in another spelling is the same command.
    upper = signed("reboot_host", cid.upper())
    assert exchange(helper.socket_path, upper)["error_code"] == "replayed"
    helper.stop()
    after_reboot = keyed()   # the same state dir: the replay store survives
    assert exchange(after_reboot.socket_path, frame)["error_code"] == "replayed"
    assert len(after_reboot.audits(event="mock_exec")) == 0


@pytest.mark.parametrize("payload_action,payload_id,code", [
    ("shutdown_host", None, "bad_request"),   # signed as a shutdown, asked as a reboot
    ("reboot_host", str(uuid.uuid4()), "bad_request"),   # another command's signed bytes
])
def test_the_signed_bytes_decide_action_and_command_id(keyed, payload_action, payload_id, code):
    helper = keyed()
    cid = str(uuid.uuid4())
    payload = command_payload(payload_action, payload_id or cid)
    frame = request("reboot_host", cid, payload=payload, signature=signing.sign(KEY, payload))
    assert exchange(helper.socket_path, frame)["error_code"] == code
    assert helper.audits(event="mock_exec") == []


@pytest.mark.parametrize("payload", [b"not json", b"[1]", b'{"command_id": 1}',
                                     b"[" * 20000 + b"]" * 20000])
def test_a_signed_payload_that_is_not_a_command_is_refused(keyed, payload):
    helper = keyed()
    frame = request("reboot_host", str(uuid.uuid4()), payload=payload[:4096],
                    signature=signing.sign(KEY, payload[:4096]))
    assert exchange(helper.socket_path, frame)["error_code"] == "bad_request"


def test_expiry_is_judged_from_the_signed_bytes_when_the_clock_is_trusted(keyed):
    trusted = keyed(INFOSCREEN_CLOCK_TRUST="always")
    past = signed(expires_in=-5)
    far = signed(expires_in=8 * 86400)   # longer than the replay store keeps ids
    assert exchange(trusted.socket_path, past)["error_code"] == "expired"
    assert exchange(trusted.socket_path, far)["error_code"] == "expired"
    assert trusted.audits(event="mock_exec") == []
    trusted.stop()
    # An unsynchronised clock cannot judge expiry (the client's own rules did, before).
    untrusted = keyed(INFOSCREEN_CLOCK_TRUST="auto")
    if Path(server.TIMESYNC_FLAG).exists():
        pytest.skip("this machine's clock is synchronised by systemd-timesyncd")
    assert exchange(untrusted.socket_path, past)["ok"] is True


@pytest.mark.parametrize("problem", ["group_readable", "other_writable", "malformed", "upper_case",
                                     "symlink", "directory"])
def test_a_key_file_others_may_touch_or_that_is_not_a_key_stops_the_start(helper_env, sockdir, problem):
    path = sockdir / "command.key"
    if problem == "symlink":
        (sockdir / "real.key").write_text(signing.key_text(KEY))
        (sockdir / "real.key").chmod(0o600)
        path.symlink_to(sockdir / "real.key")
    elif problem == "directory":
        path.mkdir(mode=0o700)
    else:
        path.write_text({"malformed": "abc\n", "upper_case": KEY.hex().upper()}.get(problem, signing.key_text(KEY)))
        path.chmod({"group_readable": 0o640, "other_writable": 0o602}.get(problem, 0o600))
    done = run_refused({**helper_env, "HELPER_COMMAND_KEY_FILE": str(path)})
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("infoscreen-helper: refusing to start: HELPER_COMMAND_KEY_FILE")
    assert KEY.hex() not in done.stderr


def test_production_without_a_key_refuses_to_start_unless_unsigned_is_allowed(helper_env, sockdir):
    env = {**helper_env, "INFOSCREEN_ENV": "production", "COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE": "0", "HELPER_MAX_ACTIONS_PER_HOUR": "3",
           "HELPER_COMMAND_KEY_FILE": str(sockdir / "absent.key")}
    done = run_refused(env)
    assert done.returncode == 2 and "HELPER_COMMAND_KEY_FILE" in done.stderr and "HELPER_ALLOW_UNSIGNED" in done.stderr
    cfg = server.load_config({**env, "HELPER_ALLOW_UNSIGNED": "1"})
    assert cfg.key is None and cfg.mode == "production"


@root_only
def test_the_client_user_cannot_read_the_key(key_file):
    def try_read():
        try:
            key_file.read_bytes()
            return "read"
        except PermissionError:
            return "denied"
    assert run_as_nobody(try_read) == "denied"


def test_one_command_id_rule_for_the_worker_and_the_helper():
    assert protocol.COMMAND_ID.pattern == ids.UUID_PATTERN
    for value in [str(uuid.uuid4()), str(uuid.uuid4()).upper(), uuid.uuid4().hex, "{%s}" % uuid.uuid4(),
                  "urn:uuid:%s" % uuid.uuid4(), str(uuid.uuid4()) + "\n", "", "x" * 36]:
        assert ids.is_uuid(value) == bool(protocol.COMMAND_ID.fullmatch(value)), value
    assert protocol.SIGNATURE.fullmatch(signing.sign(KEY, b"x"))


def test_the_helper_verifies_what_wire_signing_signs(tmp_path):
    """The helper's standard-library verification and the operator side's signing agree."""
    key_path = tmp_path / "k"
    key_path.write_text(signing.key_text(KEY))
    key_path.chmod(0o600)
    cfg = server.load_config({"HELPER_COMMAND_KEY_FILE": str(key_path), "INFOSCREEN_ENV": "test", "HELPER_ALLOWED_GROUPS": "0"})
    assert cfg.key == signing.read_key_file(key_path) == KEY
    cid = str(uuid.uuid4())
    payload = command_payload("reboot_host", cid)
    assert server.authenticate(cfg, "reboot_host", cid, payload, signing.sign(KEY, payload)) > time.time()
    with pytest.raises(protocol.ProtocolError) as refused:
        server.authenticate(cfg, "reboot_host", cid, payload, signing.sign(KEY, payload + b"\n"))
    assert refused.value.code == "signature_invalid"


class _Clock:
    def __init__(self, wall, mono):
        self.wall, self.mono = wall, mono


@pytest.fixture
def clock(monkeypatch):
    c = _Clock(1.8e9, 5000.0)
    monkeypatch.setattr(server.time, "time", lambda: c.wall)
    monkeypatch.setattr(server.time, "monotonic", lambda: c.mono)
    return c


def _record_action(dfd, limit):
    state = server._load_state(dfd, limit)
    server._save_state(dfd, dict(state, ts=state["ts"] + [state["hw"]]))


@pytest.mark.parametrize("jump", ["back_a_year", "back_then_forward_again", "back_across_a_reboot"])
def test_a_clock_that_jumps_cannot_empty_the_breaker(tmp_path, clock, jump):
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _record_action(dfd, 1)
        clock.mono += 60
        clock.wall -= 365 * 86400   # e.g. a board without a clock booting at an old time
        assert len(server._load_state(dfd, 1)["ts"]) == 1
        if jump == "back_then_forward_again":   # once clamped to the old time, this emptied it
            clock.mono += 60
            clock.wall += 365 * 86400 + 60
        elif jump == "back_across_a_reboot":
            clock.mono = 10.0   # a new boot: the monotonic clock started again
        assert len(server._load_state(dfd, 1)["ts"]) == 1
        clock.mono += 3601   # an hour later on the monotonic clock, the action no longer counts
        clock.wall += 3601
        assert server._load_state(dfd, 1)["ts"] == [] or jump == "back_across_a_reboot"
    finally:
        os.close(dfd)
