"""The limits the provisioned mosquitto.conf sets on one client, enforced by a real Mosquitto.

Each bounds what one account (a stolen device password, say) can cost the broker: the size of a
packet, the messages and bytes kept for a session that does not read, the keepalive, the topic
alias table. The MQTT 5 ones are visible in the CONNACK the broker sends.
"""

from __future__ import annotations

import pytest

from infoscreen.ctl import provision as prov
from tests.support.mqtt import SUCCESS

WEEK = 7 * 86400


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
def test_the_generated_config_starts_without_a_deprecation_note(broker_factory, device_uuid, tls):
    """Debian's mosquitto, given the generated configuration, prints no note about a deprecated
    or replaced option (message_size_limit used to draw one)."""
    b = broker_factory([device_uuid], tls=tls)
    log = b.log_text().lower()
    notes = [line for line in log.splitlines() if "deprecat" in line or "recommended" in line]
    assert notes == []
    # Nothing else to say about the configuration either: what mosquitto prints while it reads
    # it and starts (everything before its "running" line).
    startup = log.split(" running\n", 1)[0].splitlines()
    assert startup and log.count(" running\n") == 1
    complaints = [line for line in startup
                  if ("warning" in line or "error" in line or "note" in line) and "should not be run as root" not in line]
    assert complaints == []


def test_connack_tells_mqtt5_clients_the_limits(broker, device_uuid, device_probe):
    dev = device_probe(device_uuid, keepalive=600)
    props = dev.connack_properties
    assert props.MaximumPacketSize == prov.MAX_PACKET_SIZE == 262144
    assert props.TopicAliasMaximum == prov.MAX_TOPIC_ALIAS
    assert props.ServerKeepAlive == prov.MAX_KEEPALIVE_S  # 600 asked, 120 granted
    dev.close()
    no_keepalive = device_probe(device_uuid, keepalive=0)
    assert no_keepalive.connack_properties.ServerKeepAlive == prov.MAX_KEEPALIVE_S


def test_a_packet_over_256_kib_disconnects_its_sender(broker, device_uuid, server_probe, device_probe):
    topic = f"infoscreen/{device_uuid}/health"
    server = server_probe()
    server.subscribe(topic)
    dev = device_probe(device_uuid)
    big = b"x" * (200 * 1024)
    assert dev.publish(topic, big) == SUCCESS  # under the limit: delivered
    assert server.wait_for(topic).payload == big
    with pytest.raises(ConnectionError):
        dev.publish(topic, b"x" * prov.MAX_PACKET_SIZE)  # with its header, over: the broker hangs up
    dev.wait_disconnected()
    assert [len(m.payload) for m in server.messages(topic)] == [len(big)]
    dev.close()  # (its client would send the refused packet again on a reconnect)
    assert device_probe(device_uuid).publish(topic, b"small") == SUCCESS  # the account is not punished


def drain_offline_queue(broker, device_uuid, server, device_probe, payloads) -> list[bytes]:
    """Publish `payloads` to a device whose persistent session is offline, reconnect it, and
    return what it received of them (a marker published after the reconnect orders the count)."""
    topic = f"infoscreen/{device_uuid}/commands"
    dev = device_probe(device_uuid, clean_start=False, session_expiry=WEEK)
    dev.subscribe(topic)
    dev.close()
    for p in payloads:
        assert server.publish(topic, p) == SUCCESS
    dev.connect()
    # The marker itself is dropped while the session is still over its bounds: send it again
    # until one arrives (queued in order, it comes after everything kept before it).
    for _ in range(40):
        assert server.publish(topic, b"marker") == SUCCESS
        try:
            dev.wait_for(topic, lambda m: m.payload == b"marker", timeout=0.5)
            break
        except TimeoutError:
            continue
    else:
        raise AssertionError("no marker arrived in 20 s")
    return [m.payload for m in dev.messages(topic) if m.payload != b"marker"]


def test_an_offline_session_keeps_at_most_1000_messages(broker, device_uuid, server_probe, device_probe):
    sent = [f"{i}".encode() for i in range(prov.MAX_QUEUED_MESSAGES + 100)]
    got = drain_offline_queue(broker, device_uuid, server_probe(), device_probe, sent)
    # The oldest are kept, the rest dropped; a few may count as in flight rather than queued.
    assert prov.MAX_QUEUED_MESSAGES <= len(got) <= prov.MAX_QUEUED_MESSAGES + prov.MAX_INFLIGHT_MESSAGES
    assert got == sent[:len(got)]


def test_an_offline_session_keeps_at_most_16_mib(broker, device_uuid, server_probe, device_probe):
    chunk = 200 * 1024
    sent = [bytes([65 + i % 26]) + bytes([48 + i % 10]) * (chunk - 1) for i in range(100)]  # 19.5 MiB
    got = drain_offline_queue(broker, device_uuid, server_probe(), device_probe, sent)
    assert got == sent[:len(got)]
    assert 1 <= len(got) and (len(got) - 1) * chunk <= prov.MAX_QUEUED_BYTES < len(sent) * chunk
