"""The provisioned ACL, enforced by a real Mosquitto (tests/support/broker.py).

Every row of the one topic table (infoscreen/wire/topics.py: the contract's table of
docs/server-integration.md with its one change, the server may write service_failed) both ways,
and the topics the worker, infoscreenctl and the alert unit really publish and subscribe to, read
from the broker's own log, each covered by a row. All checks use MQTT 5 at QoS 1, where Mosquitto answers a refused publish with
PUBACK reason code 0x87 (135); under MQTT 3.1.1 or at QoS 0 it is dropped silently.

Absence of a delivery is proved without a fixed wait where possible: the refused publishes are
made (and answered by the broker) first, then an allowed publish on the same topic; once the
subscriber receives the allowed message, anything the broker had let through earlier would have
arrived before it.
"""

from __future__ import annotations

import re

import pytest

from infoscreen.wire import topics
from tests.support.mqtt import NOT_AUTHORIZED, SUCCESS, MqttProbe, accepted

GROUP = "lobby"


def instances() -> list:
    """Every row of the one topic table (infoscreen/wire/topics.py, which `broker provision`
    renders into the ACL) as concrete topics: a device's, a group's, each log level."""
    out = []
    for row in topics.TABLE:
        levels = topics.LOG_LEVELS if "{level}" in row.template else ("#",)
        for level in levels:
            out.append(pytest.param(row, level, id=row.name + ("" if level == "#" else "/" + level)))
    return out


def concrete(row: topics.Row, uuid: str, level: str) -> str:
    return row.fill(uuid, GROUP, level)


# Who each role is, and a topic it may read with its writer, published after a refused delivery:
# its arrival proves the broker did not deliver the earlier one (deliveries are in order).
def _marker(role: str, device_uuid: str, other_device_uuid: str, topic: str) -> tuple[str, str]:
    device = topics.commands(device_uuid) if topic != topics.commands(device_uuid) else topics.command_alias(device_uuid)
    return {"server": (topics.heartbeat(other_device_uuid), "other"),
            "device": (device, "server"),
            "other": (topics.commands(other_device_uuid), "server")}[role]


@pytest.mark.parametrize("row,level", instances())
def test_every_row_of_the_table_both_ways(row, level, broker, device_uuid, other_device_uuid, server_probe,
                                          device_probe):
    """Writers are accepted, everyone else is refused (PUBACK 0x87); readers receive what a writer
    published, everyone else receives nothing. The other device has the device role only on a
    group's topics, which every screen reads."""
    topic = concrete(row, device_uuid, level)
    clients = {"server": server_probe(), "device": device_probe(device_uuid), "other": device_probe(other_device_uuid)}

    def role(name: str) -> str:
        return "device" if name == "device" or (name == "other" and not row.per_device) else \
            ("server" if name == "server" else "none")

    for name, c in clients.items():
        assert c.subscribe(topic) == [1]  # granted; the ACL then applies to every message
        if name != "server":
            c.subscribe(_marker(name, device_uuid, other_device_uuid, topic)[0])
    clients["server"].subscribe(_marker("server", device_uuid, other_device_uuid, topic)[0])
    writers = [n for n in clients if role(n) in row.writers]
    assert writers, row
    for name, c in clients.items():
        if name not in writers:
            assert c.publish(topic, f"forged by {name}".encode()) == NOT_AUTHORIZED, name
    for name in writers:
        assert clients[name].publish(topic, f"from {name}".encode()) == SUCCESS, name
    for name, c in clients.items():
        marker, by = _marker(name, device_uuid, other_device_uuid, topic)
        assert clients[by].publish(marker, b"marker") == SUCCESS
        c.wait_for(marker, lambda m: m.payload == b"marker")
        got = sorted(m.payload for m in c.messages(topic))
        if role(name) in row.readers:
            assert got == sorted(f"from {w}".encode() for w in writers), name
        else:
            assert got == [], name


def test_device_cannot_read_what_it_writes(broker, device_uuid, server_probe, device_probe):
    """Reads are restricted too: a device receives none of its own outgoing topics."""
    dev = device_probe(device_uuid)
    assert dev.subscribe("#") == [1]  # granted, but filtered message by message
    for row in topics.TABLE:
        if topics.DEVICE in row.writers:
            assert dev.publish(concrete(row, device_uuid, "info"), b"x") == SUCCESS
    # A topic it may read, published last: its arrival orders the check.
    assert server_probe().publish(f"infoscreen/{device_uuid}/commands", b"marker") == SUCCESS
    dev.wait_for(f"infoscreen/{device_uuid}/commands")
    assert [m.topic for m in dev.messages("#")] == [f"infoscreen/{device_uuid}/commands"]


def test_device_cannot_read_another_devices_commands_or_acks(
    broker, device_uuid, other_device_uuid, server_probe, device_probe
):
    spy = device_probe(other_device_uuid)
    for t in ("commands", "command", "group_id", "commands/ack", "command/ack", "heartbeat",
              "health", "logs/#", "service_failed", "#"):
        # Mosquitto grants the subscription; the ACL is applied to each message.
        assert spy.subscribe(f"infoscreen/{device_uuid}/{t}") == [1]
    assert spy.subscribe("infoscreen/events/+") == [1]
    server, dev = server_probe(), device_probe(device_uuid)
    for t in ("commands", "command", "group_id"):
        assert server.publish(f"infoscreen/{device_uuid}/{t}", b"secret") == SUCCESS
    for t in ("commands/ack", "command/ack", "heartbeat", "health", "logs/info", "service_failed"):
        assert dev.publish(f"infoscreen/{device_uuid}/{t}", b"secret") == SUCCESS
    assert server.publish(f"infoscreen/events/{GROUP}", b"marker") == SUCCESS
    spy.wait_for(f"infoscreen/events/{GROUP}")
    assert spy.messages(f"infoscreen/{device_uuid}/#") == []


def test_server_reads_everything_it_needs_with_wildcards(
    broker, device_uuid, other_device_uuid, server_probe, device_probe
):
    server = server_probe()
    filters = ["infoscreen/+/commands/ack", "infoscreen/+/command/ack", "infoscreen/+/heartbeat",
               "infoscreen/+/health", "infoscreen/+/logs/#", "infoscreen/+/service_failed"]
    for f in filters:
        assert server.subscribe(f) == [1]
    expected = set()
    for u in (device_uuid, other_device_uuid):
        dev = device_probe(u)
        for t in ("commands/ack", "command/ack", "heartbeat", "health", "logs/error", "logs/warn",
                  "logs/info", "service_failed"):
            topic = f"infoscreen/{u}/{t}"
            assert dev.publish(topic, topic) == SUCCESS
            expected.add(topic)
    for topic in expected:
        assert server.wait_for(topic).text == topic


def test_server_cannot_read_commands_or_publish_outside_its_topics(broker, device_uuid, server_probe):
    server = server_probe()
    assert server.publish(f"infoscreen/{device_uuid}/something_else", b"x") == NOT_AUTHORIZED
    assert server.publish("elsewhere", b"x") == NOT_AUTHORIZED
    assert server.publish("$SYS/broker/x", b"x") == NOT_AUTHORIZED
    assert server.publish(f"infoscreen/{device_uuid}/logs/info", b"x") == NOT_AUTHORIZED


def test_server_clears_a_retained_service_failed(
    broker, device_uuid, other_device_uuid, server_probe, device_probe
):
    topic = f"infoscreen/{device_uuid}/service_failed"
    other = f"infoscreen/{other_device_uuid}/service_failed"
    alert = {"event": "service_failed", "unit": "infoscreen-simclient.service",
             "client_uuid": device_uuid, "failed_at": "2026-04-05T08:00:00Z"}
    assert accepted(device_probe(device_uuid).publish(topic, alert, retain=True))
    assert accepted(device_probe(other_device_uuid).publish(other, b"{}", retain=True))

    first = server_probe()
    first.subscribe("infoscreen/+/service_failed")
    msg = first.wait_for(topic)
    assert msg.retain and msg.json() == alert

    assert first.publish(topic, b"", retain=True) == SUCCESS  # the clearing
    assert first.wait_for(topic).payload == b""

    later = server_probe()
    later.subscribe("infoscreen/+/service_failed")
    later.wait_for(other)  # retained messages of one subscription are sent together
    assert later.messages(topic) == []


def test_retained_alert_survives_a_broker_restart(broker, device_uuid, server_probe, device_probe):
    topic = f"infoscreen/{device_uuid}/service_failed"
    dev = device_probe(device_uuid)
    assert accepted(dev.publish(topic, b'{"event": "service_failed"}', retain=True))
    port = broker.port
    broker.stop()  # SIGTERM: mosquitto saves its database
    dev.wait_disconnected()
    broker.start()
    assert broker.port == port
    server = server_probe()
    server.subscribe(topic)
    assert server.wait_for(topic).retain


@pytest.mark.parametrize("protocol", [5, 4], ids=["mqtt5", "mqtt311"])
def test_anonymous_connection_refused(broker, protocol):
    probe = MqttProbe(broker.host, broker.port, protocol=protocol)
    try:
        probe.connect(check=False)
        assert probe.connack != 0
        if protocol == 5:
            assert probe.connack in (134, 135)  # bad user name or password / not authorized
    finally:
        probe.close()


def test_wrong_password_and_unknown_user_refused(broker, device_uuid):
    for user, password in ((broker.device_user(device_uuid), "wrong"),
                           ("infoscreen-client-00000000", "x"),
                           (broker.server_user, broker.device_password(device_uuid))):
        probe = MqttProbe(broker.host, broker.port, username=user, password=password)
        try:
            probe.connect(check=False)
            assert probe.connack in (134, 135), user
        finally:
            probe.close()


def test_device_env_logs_in(broker, device_uuid, mqtt_probe_factory):
    env = broker.device_env(device_uuid)
    assert env["CLIENT_UUID"] == device_uuid
    assert env["MQTT_USER"] == f"infoscreen-client-{device_uuid[:8]}"
    assert (env["MQTT_BROKER"], int(env["MQTT_PORT"])) == (broker.host, broker.port)
    probe = mqtt_probe_factory(env["MQTT_BROKER"], int(env["MQTT_PORT"]), username=env["MQTT_USER"],
                               password=env["MQTT_PASSWORD_BROKER"], client_id=env["CLIENT_UUID"])
    assert probe.connected


# -- the topics the programs really use --------------------------------------------------------

_CLIENT = re.compile(r"New client connected from \S+ as (\S+) \(p\d, c\d, k\d+, u'([^']*)'\)")
_PUBLISH = re.compile(r"Received PUBLISH from (\S+) \(d\d, q\d, r\d, m\d+, '([^']*)'")
_SUBSCRIBED = re.compile(r"^\d+: (\S+) \d (\S+)$")


def used_topics(log: str) -> tuple[dict[str, str], list[tuple[str, str]], list[tuple[str, str]]]:
    """From Mosquitto's debug log: {client id: account}, [(client id, topic published)],
    [(client id, filter subscribed)]."""
    accounts = dict(_CLIENT.findall(log))
    published = _PUBLISH.findall(log)
    subscribed = [m.groups() for line in log.splitlines() if (m := _SUBSCRIBED.match(line)) and m.group(1) in accounts]
    return accounts, published, subscribed


def within(pattern: str, filter_: str) -> bool:
    """Every topic `filter_` matches is matched by the ACL `pattern` (MQTT wildcards both)."""
    p, f = pattern.split("/"), filter_.split("/")
    for i, part in enumerate(p):
        if part == "#":
            return True
        if i >= len(f) or (part == "+" and f[i] == "#") or (part not in ("+", f[i])):
            return False
    return len(p) == len(f)


def granted(role: str, uuid: str | None, access: str) -> list[str]:
    return [line.split(" ", 2)[2] for line in topics.acl_lines(role, uuid) if line.split(" ")[1] in (access, "readwrite")]


def test_the_topics_the_programs_use_are_all_in_the_table(broker_factory, device_uuid, tree_factory, capsys):
    """The whole device (supervisor, MQTT and health workers, helper), `infoscreenctl send`,
    `watch` and `alerts` (list and clear) and the alert unit run against a broker that logs every
    PUBLISH and SUBSCRIBE; each topic a program published is one its account may write, and each
    filter it subscribed to lies within what its account may read, by the table."""
    from infoscreen.ctl import cli
    from infoscreen.ctl import provision as prov
    from infoscreen.notify_failure import main as nf

    b = broker_factory([device_uuid], start=False)
    prov.provision(b.devices, b.workdir, listen=b.host, port=b.port, server_user=b.server_user,
                   run_as_user=b.run_as_user, autosave_interval=b.autosave_interval, log_types=("all",))
    b.start()
    env = ["--env", str(b.server_env_path)]
    with MqttProbe(b.host, b.port, username=b.server_user, password=b.server_password) as server:
        server.connect()
        server.subscribe(topics.health(device_uuid))
        server.subscribe(topics.logs(device_uuid, "warn"))
        tree = tree_factory(b, device_uuid).start()
        server.subscribe(topics.heartbeat(device_uuid))
        server.wait_for(topics.heartbeat(device_uuid), timeout=10)  # the worker is connected and subscribed
        assert server.publish(topics.group_id(device_uuid), b"lobby") == SUCCESS  # group topics subscribed
        assert cli.main(["send", "reboot", "--device", device_uuid, "--wait", "--timeout", "20", *env]) == 0
        assert cli.main(["watch", "--json", "--count", "2", *env]) == 0
        server.wait_for(topics.health(device_uuid), timeout=10)
        assert server.publish(topics.group_id(device_uuid), b"a/b") == SUCCESS  # refused: a warning is logged
        server.wait_for(topics.logs(device_uuid, "warn"), timeout=10)
    device_env = {**tree.env, "INFOSCREEN_STATE_DIR": str(tree.state)}
    assert nf.main(["--no-state-check", "infoscreen-simclient.service"], environ=device_env) == 0
    assert cli.main(["alerts", "--json", *env]) == 0
    assert cli.main(["alerts", "clear", device_uuid, *env]) == 0
    assert device_uuid in capsys.readouterr().out
    tree.stop()

    accounts, published, subscribed = used_topics(b.log_text())
    ours = {cid: user for cid, user in accounts.items() if not cid.startswith("probe-")}  # the test's own
    assert device_uuid in ours and any(cid.startswith("infoscreenctl-") for cid in ours), ours

    def role_of(cid: str) -> tuple[str, str | None]:
        return (topics.DEVICE, cid) if ours[cid] == b.device_user(device_uuid) else (topics.SERVER, None)

    seen_pub, seen_sub = set(), set()
    for cid, topic in published:
        if cid in ours:
            role, uuid = role_of(cid)
            assert any(within(p, topic) for p in granted(role, uuid, "write")), (role, topic)
            seen_pub.add((role, topics.parse(topic)[0] if topics.parse(topic) else topic))
    for cid, filter_ in subscribed:
        if cid in ours:
            role, uuid = role_of(cid)
            assert any(within(p, filter_) for p in granted(role, uuid, "read")), (role, filter_)
            seen_sub.add((role, filter_.replace(device_uuid, "{uuid}")))
    # What was seen: the check above covered every program's traffic, not a part of it.
    assert {(topics.DEVICE, n) for n in ("ack", "ack_alias", "heartbeat", "health", "logs", "service_failed")} <= seen_pub
    assert {(topics.SERVER, "commands"), (topics.SERVER, "service_failed")} <= seen_pub
    assert {(topics.DEVICE, "infoscreen/{uuid}/commands"), (topics.DEVICE, "infoscreen/{uuid}/command"),
            (topics.DEVICE, "infoscreen/{uuid}/group_id"), (topics.DEVICE, "infoscreen/events/lobby"),
            (topics.DEVICE, "infoscreen/groups/lobby/power/intent"),
            (topics.SERVER, "infoscreen/{uuid}/commands/ack"), (topics.SERVER, "infoscreen/+/heartbeat"),
            (topics.SERVER, "infoscreen/+/service_failed")} <= seen_sub


def test_within_is_strict_about_wildcards():
    assert within("infoscreen/+/logs/#", "infoscreen/+/logs/#")
    assert within("infoscreen/+/heartbeat", "infoscreen/abc/heartbeat")
    assert not within("infoscreen/+/heartbeat", "infoscreen/#")
    assert not within("infoscreen/+/x/+", "infoscreen/+/x/#")
    assert not within("infoscreen/abc/commands", "infoscreen/+/commands")
    assert not granted(topics.DEVICE, "abc", "write") == granted(topics.SERVER, None, "write")
