"""Property test: thousands of random frames against ONE long-running helper (mock mode).

Every connection gets a well-formed answer or a close, the helper never dies, and nothing that
is not a valid request is ever executed: the number of executions recorded by the mock backend
is exactly twice (pre-flight + action) the number of `ok` answers, and only valid requests, by
an oracle written independently of the helper's decoder, get `ok`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infoscreen.supervisor.helper_client import decode_response
from tests.helper.helper_support import DISPATCH, DRY_RUN, Helper, exchange

UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
FUZZ = settings(max_examples=1200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _pairs(items):
    if len({k for k, _ in items}) != len(items):
        raise ValueError("duplicate key")
    return dict(items)


def _constant(name):
    raise ValueError(name)


def oracle_is_valid(frame: bytes) -> bool:
    """The v1 request rules, restated from the spec rather than from protocol.py."""
    if len(frame) > 4096:
        return False
    try:
        obj = json.loads(frame.decode("utf-8"), object_pairs_hook=_pairs, parse_constant=_constant)
    except (ValueError, RecursionError):
        return False
    return (isinstance(obj, dict) and sorted(obj) == ["action", "command_id", "v"]
            and type(obj["v"]) is int and obj["v"] == 1
            and obj["action"] in ("reboot_host", "shutdown_host")
            and isinstance(obj["command_id"], str) and UUID_RE.fullmatch(obj["command_id"]) is not None)


@pytest.fixture(scope="module")
def fuzz_helper():
    sockdir = tempfile.mkdtemp(prefix="ish-fuzz-", dir="/tmp")
    env = {"HELPER_SOCKET": f"{sockdir}/helper.sock", "HELPER_STATE_DIR": f"{sockdir}/state",
           "HELPER_ALLOWED_GROUPS": str(os.getgid()), "HELPER_GRACE_S": "0",
           "HELPER_MAX_ACTIONS_PER_HOUR": "100000", "HELPER_READ_TIMEOUT_S": "2",
           "INFOSCREEN_ENV": "test", "COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE": "1"}
    helper = Helper(env)
    try:
        helper.wait_audit(event="start")
        helper.ok_answers = 0
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
    if decoded["ok"]:
        assert oracle_is_valid(frame), frame
        helper.ok_answers += 1
    elif not oracle_is_valid(frame):
        assert decoded["error_code"] in ("bad_request", "unsupported_action"), (frame, decoded)
    else:   # valid, but the previous action may still hold the lock for a moment
        assert decoded["error_code"] == "busy", decoded


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                         st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
near_valid = st.fixed_dictionaries(
    {"v": st.one_of(st.just(1), json_scalars),
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


valid = st.fixed_dictionaries({
    "v": st.just(1), "action": st.sampled_from(["reboot_host", "shutdown_host"]),
    "command_id": st.one_of(st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()))})


@FUZZ
@given(obj=st.one_of(valid, near_valid, st.dictionaries(st.text(max_size=12), json_values, max_size=6)))
def test_random_json_objects(fuzz_helper, obj):
    check(fuzz_helper, json.dumps(obj).encode())


@st.composite
def mutated_requests(draw):
    body = {"v": 1, "action": draw(st.sampled_from(["reboot_host", "shutdown_host"])),
            "command_id": str(draw(st.uuids()))}
    frame = bytearray(json.dumps(body).encode())
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
    frame = json.dumps({"v": 1, "action": "reboot_host", "command_id": str(uuid.uuid4())}).encode()
    check(fuzz_helper, frame)
