"""Property test: thousands of random frames against ONE long-running helper (mock mode).

Every connection gets a well-formed answer or a close, the helper never dies, and nothing that
is not a valid request is ever executed: the number of executions recorded by the mock backend
is exactly twice (pre-flight + action) the number of `ok` answers, and only valid requests, by
an oracle written independently of the helper's decoder, get `ok`.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from datetime import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infoscreen.supervisor.helper_client import decode_response
from tests.helper.helper_support import DISPATCH, DRY_RUN, Helper, command_payload, exchange, request

UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
FUZZ = settings(max_examples=1200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _pairs(items):
    if len({k for k, _ in items}) != len(items):
        raise ValueError("duplicate key")
    return dict(items)


def _constant(name):
    raise ValueError(name)


def _strict(data: bytes):
    return json.loads(data.decode("utf-8"), object_pairs_hook=_pairs, parse_constant=_constant)


def oracle_is_valid(frame: bytes) -> bool:
    """The v2 request rules of an unkeyed helper whose clock is trusted, restated from
    docs/security.md rather than from protocol.py."""
    if len(frame) > 8192:
        return False
    try:
        obj = _strict(frame)
        if not (isinstance(obj, dict) and sorted(obj) == ["action", "command_id", "payload", "signature", "v"]
                and type(obj["v"]) is int and obj["v"] == 2
                and obj["action"] in ("reboot_host", "shutdown_host")
                and isinstance(obj["command_id"], str) and UUID_RE.fullmatch(obj["command_id"])
                and isinstance(obj["payload"], str) and (obj["signature"] is None or isinstance(obj["signature"], str))):
            return False
        payload = base64.b64decode(obj["payload"], validate=True)
        cmd = _strict(payload)
        expires = datetime.fromisoformat(cmd["expires_at"])
    except (ValueError, RecursionError, binascii.Error, KeyError, TypeError, AttributeError):
        return False
    return (len(payload) <= 4096 and cmd.get("action") == obj["action"] and isinstance(cmd.get("command_id"), str)
            and cmd["command_id"].lower() == obj["command_id"].lower() and expires.tzinfo is not None
            and time.time() < expires.timestamp() <= time.time() + 7 * 86400)


@pytest.fixture(scope="module")
def fuzz_helper():
    sockdir = tempfile.mkdtemp(prefix="ish-fuzz-", dir="/tmp")
    env = {"HELPER_SOCKET": f"{sockdir}/helper.sock", "HELPER_STATE_DIR": f"{sockdir}/state",
           "HELPER_ALLOWED_GROUPS": str(os.getgid()), "HELPER_GRACE_S": "0",
           "HELPER_MAX_ACTIONS_PER_HOUR": "100000", "HELPER_READ_TIMEOUT_S": "2",
           "INFOSCREEN_ENV": "test", "COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE": "1",
           "INFOSCREEN_CLOCK_TRUST": "always"}
    helper = Helper(env)
    try:
        helper.wait_audit(event="start")
        helper.ok_answers, helper.ran = 0, set()
        yield helper
        # After all examples: alive, and executions match ok answers exactly.
        assert helper.proc.poll() is None, "the helper died under fuzzing"
        done = helper.wait_audit(count=helper.ok_answers, event="exec", timeout=30)
        assert len(done) == helper.ok_answers
        assert helper.ok_answers >= 50, "the fuzzer should also produce valid requests"
        execs = helper.audits(event="mock_exec")
        assert len(execs) == 2 * helper.ok_answers
        allowed = [*DISPATCH.values(), *DRY_RUN.values()]
        assert all(e["argv"] in allowed and e["env"] == {} and e["shell"] is False for e in execs)
    finally:
        helper.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


def check(helper: Helper, frame: bytes):
    answer = exchange(helper.socket_path, frame, timeout=10)
    if answer is None:   # a close is allowed; a crash is not
        assert helper.proc.poll() is None
        return
    decoded = decode_response(json.dumps(answer).encode())   # well-formed
    assert decoded["mock"] is True
    valid = oracle_is_valid(frame)
    key = json.loads(frame)["command_id"].lower() if valid else None
    if decoded["ok"]:
        assert valid and key not in helper.ran, frame
        helper.ok_answers += 1
        helper.ran.add(key)
    elif not valid:
        assert decoded["error_code"] in ("bad_request", "unsupported_action", "expired"), (frame, decoded)
    elif key in helper.ran:   # never twice (or busy: the lock is taken before the replay store is read)
        assert decoded["error_code"] in ("replayed", "busy"), decoded
    else:   # valid, but the previous action may still hold the lock for a moment
        assert decoded["error_code"] == "busy", decoded


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                         st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
payloads = st.one_of(
    st.builds(lambda a, c, e: base64.b64encode(command_payload(a, c, e)).decode(),
              st.sampled_from(["reboot_host", "shutdown_host", "x"]), st.uuids().map(str),
              st.sampled_from([600.0, -5.0, 8 * 86400.0])),
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()), json_values)
near_valid = st.fixed_dictionaries(
    {"v": st.one_of(st.just(2), st.just(1), json_scalars), "payload": payloads,
     "signature": st.one_of(st.none(), st.text(max_size=80), json_values),
     "action": st.one_of(st.sampled_from(["reboot_host", "shutdown_host", "REBOOT_HOST",
                                          "reboot", "", "reboot_host\x00"]), json_values),
     "command_id": st.one_of(st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()),
                             st.uuids().map(lambda u: "{%s}" % u), json_values)},
    optional={"reason": json_values, "argv": st.lists(st.text(max_size=10), max_size=3),
              "env": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)})


@FUZZ
@given(frame=st.binary(max_size=5000))
def test_random_bytes(fuzz_helper, frame):
    check(fuzz_helper, frame)


valid = st.builds(lambda a, c, up: json.loads(request(a, c.upper() if up else c)),
                  st.sampled_from(["reboot_host", "shutdown_host"]), st.uuids().map(str), st.booleans())


@FUZZ
@given(obj=st.one_of(valid, near_valid, st.dictionaries(st.text(max_size=12), json_values, max_size=6)))
def test_random_json_objects(fuzz_helper, obj):
    check(fuzz_helper, json.dumps(obj).encode())


@st.composite
def mutated_requests(draw):
    frame = bytearray(request(draw(st.sampled_from(["reboot_host", "shutdown_host"])), str(draw(st.uuids()))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "duplicate"]))
        pos = draw(st.integers(0, max(len(frame) - 1, 0)))
        if op == "flip" and frame:
            frame[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "delete":
            del frame[pos:pos + draw(st.integers(1, 8))]
        elif op == "insert":
            frame[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            del frame[pos:]
        else:
            frame[pos:pos] = frame[pos:pos + draw(st.integers(1, 30))]
    return bytes(frame)


@FUZZ
@given(frame=mutated_requests())
def test_mutated_valid_requests(fuzz_helper, frame):
    check(fuzz_helper, frame)


def test_valid_requests_still_work_after_fuzzing(fuzz_helper):
    check(fuzz_helper, request("reboot_host", str(uuid.uuid4())))
