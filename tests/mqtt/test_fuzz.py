"""Property-based fuzz of the command payload: in-process against the validation (thousands of
cases), and a smaller run through the real broker to the running worker."""

from __future__ import annotations

import json
import random
import uuid as uuidlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infoscreen.wire.schema import ERROR_CODES
from infoscreen.workers.mqtt.clock import FakeClock, judge
from infoscreen.workers.mqtt.validation import Command, Rejection, readable_command_id, validate

OURS = "9b8d1856-ff34-4864-a726-12de072d0f77"
FIELDS = ["command_id", "action", "expires_at", "issued_at", "schema_version", "client_uuid", "reason",
          "requested_by", "extra"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=40),
    st.sampled_from(["reboot_host", "shutdown_host", "1.0", "2.0", "1", "x.y", OURS, OURS.upper(),
                     "2026-04-05T08:10:00Z", "2026-04-05T08:10:00", "2099-01-01T00:00:00+02:00",
                     str(uuidlib.UUID(int=7)), "", " ", "\x00"]),
)
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c, max_size=3)),
                      max_leaves=6)
commands = st.dictionaries(st.sampled_from(FIELDS), values, max_size=len(FIELDS))
payloads = st.one_of(
    commands.map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    commands.map(lambda d: json.dumps(d).encode()[: random.Random(len(d)).randint(0, 60)]),
    st.builds(lambda d, pad: json.dumps({**d, "pad": "x" * pad}).encode(), commands, st.integers(0, 9000)),
)


def _no_constants(name):
    raise ValueError(name)


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(payloads)
def test_validation_is_total_and_maps_to_documented_codes(payload):
    res = validate(payload, OURS)
    try:
        obj = json.loads(payload, parse_constant=_no_constants)  # strict JSON: no NaN/Infinity
    except (ValueError, UnicodeDecodeError, RecursionError):
        obj = None
    readable = isinstance(obj, dict) and readable_command_id(obj.get("command_id")) is not None
    if isinstance(res, Rejection):
        if readable and len(payload) <= 64 * 1024:
            assert res.command_id == obj["command_id"]
            assert res.error_code in ERROR_CODES and res.error_message
        else:
            assert res.command_id is None and res.error_code is None
    else:
        assert isinstance(res, Command) and readable
        for synced in (True, False):
            code, _msg, deadline = judge(res.expires_at, res.issued_at, FakeClock(synced=synced), "boot")
            assert code in (None, "expired", "invalid_payload")
            assert (code is None) == (deadline is not None)


def test_fuzz_through_the_broker_worker_stays_alive(mqtt_worker, server):
    w = mqtt_worker(start=False, HELPER_TIMEOUT_S="30")
    w.start()
    srv = server(w)
    rng = random.Random(1234)
    sent_with_id = []
    for i in range(300):
        kind = rng.random()
        cid = str(uuidlib.uuid4())
        if kind < 0.3:
            body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
        else:
            d = {k: rng.choice([None, 1, -1.5, True, "", "x" * rng.randint(0, 400), [1], {"a": 1},
                                "reboot_host", "2.0", "2026-04-05T08:10:00Z", OURS])
                 for k in rng.sample(FIELDS, rng.randint(0, len(FIELDS)))}
            d["command_id"] = cid
            if rng.random() < 0.5:
                d["action"] = rng.choice(["nuke", "", 3])
            body = json.dumps(d).encode()
            sent_with_id.append(cid)
        srv.raw(w.uuid, body, topic=rng.choice(["commands", "command"]))
    # Every payload with a command id got a documented failed ack; the worker is still alive.
    last = sent_with_id[-1]
    ack = srv.wait_ack(w.uuid, last, "failed", timeout=20)
    assert ack["error_code"] in ERROR_CODES
    assert w.alive()
    for cid in sent_with_id:
        acks = srv.acks(w.uuid, cid)
        assert acks and all(a["status"] == "failed" and a["error_code"] in ERROR_CODES for a in acks), cid
    cid = srv.command(w.uuid, "reboot_host")
    srv.wait_ack(w.uuid, cid, "completed")
    assert "Traceback" not in w.log_text()
