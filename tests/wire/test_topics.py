"""wire/topics.py: the one topic table, its builders, filters, parsing and ACL rows (pure; the
table on a real broker is tests/broker/test_broker_acl.py)."""

from __future__ import annotations

import pytest

from infoscreen.wire import topics

U = "9b8d1856-ff34-4864-a726-12de072d0f77"


def test_the_builders_are_the_table_filled_in() -> None:
    assert topics.commands(U) == f"infoscreen/{U}/commands"
    assert topics.command_topics(U) == (f"infoscreen/{U}/commands", f"infoscreen/{U}/command")
    assert topics.ack_topics(U) == (f"infoscreen/{U}/commands/ack", f"infoscreen/{U}/command/ack")
    assert topics.group_id(U) == f"infoscreen/{U}/group_id"
    assert topics.events("lobby") == "infoscreen/events/lobby"
    assert topics.power_intent("lobby") == "infoscreen/groups/lobby/power/intent"
    assert topics.heartbeat(U) == f"infoscreen/{U}/heartbeat"
    assert topics.health(U) == f"infoscreen/{U}/health"
    assert [topics.logs(U, lv) for lv in topics.LOG_LEVELS] == [f"infoscreen/{U}/logs/{lv}" for lv in
                                                                 ("error", "warn", "info")]
    assert topics.service_failed(U) == f"infoscreen/{U}/service_failed"
    with pytest.raises(ValueError):
        topics.logs(U, "debug")


def test_every_built_topic_parses_back_to_its_row() -> None:
    built = {"commands": topics.commands(U), "command_alias": topics.command_alias(U), "group_id": topics.group_id(U),
             "events": topics.events("g"), "power_intent": topics.power_intent("g"), "ack": topics.ack(U),
             "ack_alias": topics.ack_alias(U), "heartbeat": topics.heartbeat(U), "health": topics.health(U),
             "logs": topics.logs(U, "info"), "service_failed": topics.service_failed(U)}
    assert set(built) == set(topics.ROWS)
    for name, topic in built.items():
        parsed = topics.parse(topic)
        assert parsed is not None and parsed[0] == name, topic
        assert topics.device_of(topic) == (U if topics.ROWS[name].per_device else None)


@pytest.mark.parametrize("topic", [
    "infoscreen/+/heartbeat", "infoscreen/#", f"infoscreen/{U}/heartbeat/x", f"infoscreen/{U}/logs/debug",
    "infoscreen/not-a-uuid/heartbeat", f"infoscreen/{U.replace('-', '')}/heartbeat", "other/x/heartbeat",
    f"infoscreen/{U}", "infoscreen/events/", "", "infoscreen/events/a/b",
])
def test_what_is_no_topic_of_the_contract(topic: str) -> None:
    assert topics.parse(topic) is None
    assert topics.device_of(topic) is None
    assert topics.device_topic(topic, "heartbeat") is None


def test_device_topic_is_keyed_on_the_topics_uuid_and_row() -> None:
    assert topics.device_topic(topics.heartbeat(U), "heartbeat") == U
    assert topics.device_topic(topics.heartbeat(U.upper()), "heartbeat") == U.upper()  # the rule: either case
    assert topics.device_topic(topics.health(U), "heartbeat") is None
    assert topics.is_group_topic(topics.events("g")) and topics.is_group_topic(topics.power_intent("g"))
    assert not topics.is_group_topic(topics.group_id(U))


def test_filters_for_the_whole_fleet() -> None:
    assert topics.every_device("heartbeat") == "infoscreen/+/heartbeat"
    assert topics.every_device("logs") == "infoscreen/+/logs/#"
    with pytest.raises(ValueError):
        topics.every_device("events")
    assert topics.covers("infoscreen/+/logs/#", topics.logs(U, "warn"))
    assert topics.covers("infoscreen/+/heartbeat", topics.heartbeat(U))
    assert not topics.covers("infoscreen/+/heartbeat", topics.health(U))
    assert not topics.covers("infoscreen/+/commands", topics.ack(U))
    assert topics.covers("#", "a/b") and not topics.covers("a/+", "a/b/c")


def test_acl_rows_of_each_role() -> None:
    assert topics.acl_lines(topics.SERVER) == [
        "topic write infoscreen/+/commands",
        "topic write infoscreen/+/command",
        "topic write infoscreen/+/group_id",
        "topic write infoscreen/events/+",
        "topic write infoscreen/groups/+/power/intent",
        "topic read infoscreen/+/commands/ack",
        "topic read infoscreen/+/command/ack",
        "topic read infoscreen/+/heartbeat",
        "topic read infoscreen/+/health",
        "topic read infoscreen/+/logs/#",
        "topic readwrite infoscreen/+/service_failed",
    ]
    assert topics.acl_lines(topics.DEVICE, U) == [
        f"topic read infoscreen/{U}/commands",
        f"topic read infoscreen/{U}/command",
        f"topic read infoscreen/{U}/group_id",
        "topic read infoscreen/events/+",
        "topic read infoscreen/groups/+/power/intent",
        f"topic write infoscreen/{U}/commands/ack",
        f"topic write infoscreen/{U}/command/ack",
        f"topic write infoscreen/{U}/heartbeat",
        f"topic write infoscreen/{U}/health",
        f"topic write infoscreen/{U}/logs/#",
        f"topic write infoscreen/{U}/service_failed",
    ]
