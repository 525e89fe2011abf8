"""Chaos: commands keep flowing while the MQTT worker is SIGKILLed at random moments and the
broker is restarted. Afterwards every command has exactly one terminal outcome, no command ran
twice, and every completed one ran exactly once.

Most outcomes are `busy`, by design: while a killed worker is down (its restart backs off when
kills come faster than it can settle) the broker queues the commands, and they arrive in a burst
in which only one power command can be in flight.

Short form in every run (~15 s); set INFOSCREEN_SOAK_S=600 (seconds) for a soak.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import uuid
from collections import defaultdict

import pytest

from infoscreen.wire import topics
from infoscreen.wire.schema import SCHEMA_VERSION, CommandOut, encode, format_utc

DURATION_S = float(os.environ.get("INFOSCREEN_SOAK_S", "15"))


@pytest.mark.timeout(DURATION_S + 120)
def test_no_command_lost_or_run_twice_under_kills(tree_factory, broker, device_uuid, server_probe):
    rnd = random.Random(int(os.environ.get("INFOSCREEN_CHAOS_SEED", "0")) or None)
    tree = tree_factory(broker, device_uuid, env={"SUPERVISOR_MAX_RESTARTS": "10000"}).start()
    tree.notify.wait_status(lambda s: "broker=connected" in s, timeout=15)
    srv = server_probe(clean_start=False, session_expiry=3600, client_id=f"chaos-{uuid.uuid4()}")
    srv.subscribe(topics.ack(device_uuid))

    sent: dict[str, str] = {}
    kills = broker_restarts = 0
    end = time.monotonic() + DURATION_S
    next_kill = time.monotonic() + rnd.uniform(0.3, 1.5)
    while time.monotonic() < end:
        cid = str(uuid.uuid4())
        action = rnd.choice(["reboot_host", "shutdown_host"])
        now = time.time()
        cmd = CommandOut(schema_version=SCHEMA_VERSION, command_id=cid, client_uuid=device_uuid,
                         action=action, issued_at=format_utc(now), expires_at=format_utc(now + 600))
        if srv.connected and srv.publish(topics.commands(device_uuid), encode(cmd)) in (0, 16):
            sent[cid] = action
            if rnd.random() < 0.2:  # the same command again, on the alias topic
                srv.publish(topics.command_alias(device_uuid), encode(cmd))
        if time.monotonic() >= next_kill:
            if rnd.random() < 0.15:
                broker.stop()
                broker.start()
                broker_restarts += 1
                srv.connect(timeout=10)  # the probe does not reconnect by itself
            else:
                pid = tree.workers().get("mqtt")
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    kills += 1
            next_kill = time.monotonic() + rnd.uniform(0.3, 1.5)
        time.sleep(rnd.uniform(0.01, 0.08))  # pacing of the load generator, not a synchronisation

    assert kills >= 3 and len(sent) >= 50

    def terminal_for_all() -> bool:
        seen = {m.json()["command_id"] for m in srv.messages(topics.ack(device_uuid))
                if m.json()["status"] in ("completed", "failed")}
        return set(sent) <= seen

    from tests.support.waiting import wait_until

    wait_until(terminal_for_all, 60, what="a terminal ack for every command")

    statuses: dict[str, list[dict]] = defaultdict(list)
    for m in srv.messages(topics.ack(device_uuid)):
        a = m.json()
        statuses[a["command_id"]].append(a)
    executions: dict[str, int] = defaultdict(int)
    for line in tree.helper.log_text().splitlines():
        if '"event": "exec"' in line:
            executions[json.loads(line.split(" audit ", 1)[1])["command_id"]] += 1

    for cid in sent:
        terminal = {(a["status"], a["error_code"]) for a in statuses[cid] if a["status"] in ("completed", "failed")}
        assert len(terminal) == 1, (cid, statuses[cid])  # one outcome, however often repeated
        assert executions[cid] <= 1, cid  # never run twice
        if ("completed", None) in terminal:
            assert executions[cid] == 1, cid  # completed means it really ran (mock backend)
    assert not set(executions) - set(sent)
    from collections import Counter

    outcomes = Counter(next(a["error_code"] or a["status"] for a in statuses[c] if a["status"] in ("completed", "failed"))
                       for c in sent)
    print(f"chaos: {len(sent)} commands, {kills} worker kills, {broker_restarts} broker restarts, "
          f"{sum(executions.values())} executions; outcomes {dict(outcomes)}")
