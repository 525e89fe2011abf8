"""A power cut with commands in flight, under the real systemd of the e2e container.

Everything in flight at once, then SIGKILL of the whole container (Container.power_cut: no unit
stops, nothing is flushed by the container), then a new boot on the same disk:

- R, a signed `reboot_host`, retained: the helper answered "scheduled" and is inside its grace
  period (HELPER_GRACE_S, raised to 30 s for this test so the cut lands in it for certain);
- B1 (`shutdown_host`) and B2 (`reboot_host`), signed and valid: refused `busy` (R is in flight);
- E, signed, expired before it was sent: refused `expired`;
- D, R again on the alias topic: a duplicate, answered with R's latest status;
- the acks of B1, B2, E and D are in the MQTT worker's outbox and the broker is down: the worker
  was frozen (SIGSTOP) while the commands were delivered, the broker was frozen before the worker
  resumed, so the worker's acks went into a TCP buffer nobody read, and then the broker was
  SIGKILLed (it comes back from the database it wrote at a clean restart before R).

After the boot (the broker started again only once the client runs): every command ends with
exactly one terminal ack on both ack topics (R `completed`: a new boot was observed; B1, B2
`busy`; E `expired`), the helper's journal across both boots shows R scheduled once and never
executed, the helper refuses R's exact signed bytes as `replayed` (its replay store survived the
cut), and R sent once more is answered from the record, never executed.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import time
import uuid as uuidlib
from datetime import datetime, timedelta, timezone

import pytest

from infoscreen.wire import signing
from tests.chaos.helper_audit import HelperAudit
from tests.e2e.conftest import UNIT, Device, command_for
from tests.e2e.container import EXIT_REBOOT, wait_for
from tests.support.mqtt import MqttProbe

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

HELPER_ENV = "/etc/infoscreen/helper.env"
GRACE_S = 30  # the helper's grace for this test: the whole in-flight setup fits in it
ACK_TOPICS = ("commands/ack", "command/ack")
TERMINAL = ("completed", "failed")

# One request straight to the helper's socket, as the client's account: R's exact signed bytes.
REPLAY = """
import json, socket, sys
req = sys.stdin.read().encode()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect("/run/infoscreen-helper/helper.sock")
s.sendall(req)
s.shutdown(socket.SHUT_WR)
out = b""
while chunk := s.recv(8192):
    out += chunk
print(out.decode())
"""


def command(machine: Device, action: str, *, expired: bool = False) -> dict[str, str]:
    now = datetime.now(timezone.utc)
    issued = now - timedelta(minutes=1) if expired else now
    expires = issued if expired else now + timedelta(minutes=10)  # expired: no budget either
    return command_for(machine, action, issued=issued, expires=expires, requested_by="e2e power cut")


def helper_audit(machine: Device) -> HelperAudit:
    """The helper's audit lines of every instance, across every boot of the persistent journal."""
    text = machine.c.exec(["journalctl", "--no-pager", "-q", "-o", "cat", "-u", "infoscreen-helper*"],
                          check=False).stdout
    return HelperAudit.parse(text)


def outcomes(probe: MqttProbe, machine: Device, cid: str) -> list[set[tuple[str, str | None]]]:
    """Per ack topic, the set of terminal (status, error_code) seen for `cid`."""
    out = []
    for t in ACK_TOPICS:
        got = set()
        for m in probe.messages(machine.topic(t)):
            body = m.json()
            if body["command_id"] == cid and body["status"] in TERMINAL:
                got.add((body["status"], body["error_code"]))
        out.append(got)
    return out


def test_power_cut_with_commands_in_flight(machine: Device):
    c, broker = machine.c, machine.broker
    machine.reset()
    helper_env = c.exec(["cat", HELPER_ENV]).stdout
    # A persistent session: what the client publishes while this probe is away waits for it.
    probe = MqttProbe(broker.host, broker.port, username=broker.server_user, password=broker.server_password,
                      client_id=f"e2e-power-cut-{uuidlib.uuid4()}", clean_start=False, session_expiry=900).connect()
    r = command(machine, "reboot_host")
    rid = r["command_id"]
    frozen_broker = False
    try:
        # Read by each helper instance at its start (Accept=yes): no restart needed.
        c.exec(["sh", "-c", f"cat >> {HELPER_ENV}"], input=f"HELPER_GRACE_S={GRACE_S}\n")
        for t in ACK_TOPICS:
            probe.subscribe(machine.topic(t))
        n = reconnects(c.wait_unit(UNIT, lambda p: "broker=connected" in p["StatusText"], 30, "connected"))
        # A clean restart writes the broker's database with this probe's session and subscriptions:
        # the broker is SIGKILLed below and comes back from that file.
        broker.stop()
        broker.start()
        probe.connect(timeout=10)
        for t in ACK_TOPICS:  # kept in the broker's database; again in case it was not
            probe.subscribe(machine.topic(t))
        c.wait_unit(UNIT, lambda p: "broker=connected" in p["StatusText"] and reconnects(p) > n, 60, "reconnected")
        boot1 = c.boot_id()

        # R: scheduled by the helper, its grace running (from a moment after this one).
        t_scheduled = time.monotonic()
        assert machine.publish_command(probe, r, retain=True) < 128
        for t in ACK_TOPICS:
            probe.wait_for(machine.topic(t), lambda m: m.json() == {"command_id": rid, "status": "execution_started",
                                                                    "error_code": None, "error_message": None},
                           timeout=30)
        audit = _wait(lambda: (a := helper_audit(machine)).pending == rid and a, 20, "the helper in R's grace")
        assert audit.scheduled[rid] == 1

        # B1, B2, E, D go into the socket of a frozen worker; then the broker is frozen too, so the
        # worker handles them with a broker that takes its acks into the TCP buffer and never
        # answers; then the broker dies (SIGKILL) with those acks unread. (A broker that closes the
        # connection instead trips the worker's deadlock of tests/chaos/test_broker_gone_mid_command.py.)
        b1, b2 = command(machine, "shutdown_host"), command(machine, "reboot_host")
        e = command(machine, "reboot_host", expired=True)
        worker = machine.worker_pid("infoscreen.workers.mqtt")
        c.exec(["kill", "-STOP", str(worker)])
        try:
            for cmd in (b1, b2, e):
                assert machine.publish_command(probe, cmd) == 0  # 0: the device's session got it
            assert machine.publish_command(probe, r, topic="command") == 0  # D
        finally:
            os.kill(broker.pid, signal.SIGSTOP)
            frozen_broker = True
            c.exec(["kill", "-CONT", str(worker)])
        for pattern in (rf"rejected command {b1['command_id']}: busy", rf"rejected command {b2['command_id']}: busy",
                        rf"rejected command {e['command_id']}: expired", rf"duplicate command {rid}"):
            c.wait_journal(pattern, unit=UNIT, timeout=30)
        broker.kill()
        frozen_broker = False
        # Still in flight: the grace has not run out, R has not been executed, nothing rebooted.
        assert time.monotonic() - t_scheduled < GRACE_S - 5, "too slow: the cut would miss R's grace"
        assert helper_audit(machine).pending == rid and c.running

        # The power cut, then a new boot on the same disk, the broker still down.
        rc = c.power_cut()
        assert rc not in (0, EXIT_REBOOT), f"systemd-nspawn ended {rc}: a poweroff or a reboot, not a cut"
        c.boot()
        assert c.boot_id() != boot1
        machine.wait_active()  # READY=1: the worker's store, the outbox and the helper's state came up
        c.wait_journal(rf"command {rid} \(reboot_host\): a new boot is observed", unit=UNIT, timeout=30)
        broker.start()
        probe.connect(timeout=10)

        sent = {rid: ("completed", None), b1["command_id"]: ("failed", "busy"),
                b2["command_id"]: ("failed", "busy"), e["command_id"]: ("failed", "expired")}
        _wait(lambda: all(o for cid in sent for o in outcomes(probe, machine, cid)), 90,
              "a terminal ack of every command on both topics")
        for cid, want in sent.items():
            got = outcomes(probe, machine, cid)
            assert got == [{want}, {want}], (cid, got)  # exactly one outcome, the same on both topics

        # The helper, across both boots: R scheduled once, never executed; nothing else reached it.
        audit = helper_audit(machine)
        assert audit.state_corrupt == 0
        assert audit.scheduled[rid] == 1 and audit.started(rid) == 0, audit
        assert rid in audit.died_in_grace or audit.pending == rid  # cut in its grace, no later line
        assert all(audit.scheduled[cid] == 0 and audit.started(cid) == 0 for cid in sent if cid != rid), audit

        # R's exact signed bytes straight to the helper: refused, its replay store survived.
        payload = json.dumps(r).encode()
        req = json.dumps({"v": 2, "action": "reboot_host", "command_id": rid,
                          "payload": base64.b64encode(payload).decode(), "signature": signing.sign(machine.key, payload)})
        out = c.exec(["runuser", "-u", "infoscreen", "--", "python3", "-c", REPLAY], input=req, timeout=30)
        answer = json.loads(out.stdout)
        assert answer["ok"] is False and answer["error_code"] == "replayed", answer

        # R once more through the broker: answered from the record, not executed again.
        mark = time.monotonic()
        assert machine.publish_command(probe, r, topic="command") < 128
        probe.wait_for(machine.topic("commands/ack"), lambda m: m.received_at > mark and m.json()["command_id"] == rid
                       and m.json()["status"] == "completed", timeout=30)
        assert not any(m.json()["status"] in ("accepted", "execution_started")
                       for m in probe.messages(machine.topic("commands/ack"))
                       if m.received_at > mark and m.json()["command_id"] == rid)
        after = helper_audit(machine)
        assert after.scheduled[rid] == 1 and after.started(rid) == 0
        assert c.running and c.boot_id() != boot1
        print(f"power cut: {len(sent)} commands in flight, outcomes "
              f"{ {cid[:8]: got[0] for cid, got in ((k, outcomes(probe, machine, k)) for k in sent)} }; "
              f"helper refusals {dict(after.refusals)}; boots {c.boots}")
    finally:
        if frozen_broker:
            broker.kill()
        if not broker.running:
            broker.start()
        if probe.connected or _reconnect(probe):
            probe.publish(machine.topic("commands"), b"", retain=True)  # no retained R for later tests
        probe.close()
        if c.running:
            c.exec(["sh", "-c", f"cat > {HELPER_ENV}"], input=helper_env)
        else:
            c.write_file(HELPER_ENV, helper_env, 0o600)


def reconnects(props: dict[str, str]) -> int:
    m = re.search(r"broker=\w+\(reconnects=(\d+)\)", props["StatusText"])
    return int(m.group(1)) if m else -1


def _reconnect(probe: MqttProbe) -> bool:
    try:
        probe.connect(timeout=10)
        return True
    except (OSError, TimeoutError, ConnectionError):
        return False


def _wait(predicate, timeout: float, what: str):
    """Poll a state with no event source (the container's journal, through nsenter)."""
    return wait_for(predicate, timeout, what, interval=0.25)
