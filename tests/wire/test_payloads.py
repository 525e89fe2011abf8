"""The payload Structs of infoscreen/wire/schema.py against docs/server-integration.md, and the
device's encoders (heartbeat, health, logs, alert) against the Structs: byte-compatible with the
documented examples (the same keys, the same values, in the documented order where the contract
fixes one)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
import pytest

from infoscreen.ctl import session
from infoscreen.notify_failure import main as nf
from infoscreen.wire import schema
from infoscreen.workers.mqtt.publisher import LogPublisher

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "server-integration.md").read_text(encoding="utf-8")


def example(heading: str, index: int = 0) -> bytes:
    """The `index`-th JSON example under a "### heading" of the payloads section."""
    start = DOC.index(f"\n### {heading}\n")
    end = DOC.find("\n### ", start + 5)
    blocks = re.findall(r"^```json\n(.*?)^```$", DOC[start:end], flags=re.S | re.M)
    return blocks[index].encode()


CASES = [
    ("Heartbeat", schema.Heartbeat, True),
    ("Health", schema.Health, False),  # the doc groups the extra blocks differently; JSON objects are unordered
    ("Logs", schema.LogRecord, True),
    ("service_failed", schema.ServiceFailed, True),
    ("Ack (schema v1, frozen)", schema.Ack, True),
    ("Command", schema.CommandOut, True),
]


@pytest.mark.parametrize("heading,struct,ordered", CASES, ids=[c[0] for c in CASES])
def test_the_documented_example_is_the_struct(heading, struct, ordered) -> None:
    raw = example(heading)
    doc = json.loads(raw)
    value = msgspec.json.decode(raw, type=struct)  # every documented key is a field, typed
    again = json.loads(schema.encode(value))
    assert again == doc
    if ordered:
        assert list(again) == list(doc)
    assert {f.name for f in msgspec.structs.fields(struct)} >= set(doc)


def test_the_ack_has_exactly_four_keys_nulls_included() -> None:
    ack = schema.Ack(command_id="07aab032-53c2-45ef-a5a3-6aa58e9d9fae", status="accepted")
    assert schema.encode_ack(ack) == json.dumps(json.loads(example("Ack (schema v1, frozen)")),
                                                separators=(",", ":")).encode()
    assert [f.name for f in msgspec.structs.fields(schema.Ack)] == ["command_id", "status", "error_code",
                                                                   "error_message"]


def test_health_has_the_contracts_fields_always() -> None:
    doc = json.loads(example("Health"))
    required = {f.name for f in msgspec.structs.fields(schema.Health) if f.required}
    assert {"timestamp", "expected_state", "actual_state", "broker_connection"} <= required
    assert set(doc["broker_connection"]) == {f.name for f in msgspec.structs.fields(schema.BrokerConnection)}


def test_the_log_publisher_writes_the_struct() -> None:
    sent: list[tuple[str, bytes]] = []
    pub = LogPublisher("9b8d1856-ff34-4864-a726-12de072d0f77", lambda t, p: sent.append((t, p)) or 1)
    pub.on_connect()
    pub.log("warn", "m" * 3000, "mqtt", 0.0)
    topic, payload = sent[0]
    body = json.loads(payload)
    assert topic == "infoscreen/9b8d1856-ff34-4864-a726-12de072d0f77/logs/warn"
    assert list(body) == list(json.loads(example("Logs")))  # no dropped_before: none was dropped
    assert len(body["message"]) == 2000 and body["timestamp"] == "1970-01-01T00:00:00Z"
    msgspec.json.decode(payload, type=schema.LogRecord)


def test_the_alert_is_the_struct_in_the_contracts_order() -> None:
    body = json.loads(nf.alert_payload("infoscreen-simclient.service", "u", 0))
    assert list(body) == ["event", "unit", "client_uuid", "failed_at"]
    assert body == {"event": "service_failed", "unit": "infoscreen-simclient.service", "client_uuid": "u",
                    "failed_at": "1970-01-01T00:00:00Z"}


def test_the_operator_reads_a_payload_field_by_field_with_the_structs_bounds() -> None:
    doc = json.loads(example("Health"))
    got = session.fields_of(doc, schema.Health)
    assert got["actual_state"] == doc["actual_state"] and got["broker_connection"] == doc["broker_connection"]
    hostile = dict(doc, timestamp="x" * 65, actual_state={"process": 1, "pid": 0, "status": "running"},
                   broker_connection=[1])
    got = session.fields_of(hostile, schema.Health)
    assert got["timestamp"] is None  # over the Struct's bound
    assert got["actual_state"] == {"process": None, "pid": None, "status": "running"}  # one field, one loss
    assert got["broker_connection"] is None and got["client_uuid"] == doc["client_uuid"]
    assert session.fields_of(["not", "an", "object"], schema.Heartbeat) == {
        "timestamp": None, "client_uuid": None, "uptime_s": None}


def test_health_names_the_agent_version_host_and_os(tmp_path) -> None:
    from infoscreen import __version__, agentinfo
    rel = tmp_path / "os-release"
    rel.write_text('NAME="Debian GNU/Linux"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n')
    assert agentinfo.os_name((str(tmp_path / "missing"), str(rel))) == "Debian GNU/Linux 12 (bookworm)"
    assert agentinfo.os_name((str(tmp_path / "missing"),)) is None
    rel.write_text("PRETTY_NAME=\n")
    assert agentinfo.os_name((str(rel),)) is None
    a = agentinfo.describe()
    assert a.version == __version__ and a.hostname
