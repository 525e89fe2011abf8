"""Unit tests without processes: clock rules (injected clock), outbox ordering and retries,
the rate limit, group ids, the atomic hand-off."""

from __future__ import annotations

import json

import pytest

from infoscreen.loop import Loop
from infoscreen.workers.mqtt import handoff
from infoscreen.workers.mqtt.clock import DEFAULT_BUDGET_S, MAX_AHEAD_S, Deadline, FakeClock, judge
from infoscreen.workers.mqtt.groups import parse_group
from infoscreen.workers.mqtt.outbox import Outbox
from infoscreen.workers.mqtt.ratelimit import TokenBucket
from infoscreen.workers.mqtt.store import Record, Store


def test_synchronised_clock_judges_by_wall_clock():
    c = FakeClock(synced=True)
    assert judge(c.wall() - 1, None, c, "b")[0] == "expired"
    code, _, d = judge(c.wall() + 60, c.wall() - 1000, c, "b")  # issued_at ignored when synced
    assert code is None and d.deadline_mono == c.mono() + 60
    assert judge(c.wall() + MAX_AHEAD_S + 10, None, c, "b")[0] == "invalid_payload"


def test_unsynchronised_clock_uses_a_monotonic_budget():
    c = FakeClock(wall=0.0, synced=False)  # a clock stuck in 1970
    server_now = 1_775_376_000.0
    code, _, d = judge(server_now + 120, server_now, c, "b")
    assert code is None and d.deadline_mono == c.mono() + 120
    assert not d.expired(c, "b")
    c.advance(121)
    assert d.expired(c, "b")
    code, _, d = judge(server_now + 120, None, c, "b")  # no issued_at: the default budget
    assert code is None and d.deadline_mono == c.mono() + DEFAULT_BUDGET_S
    assert judge(server_now, server_now + 5, c, "b")[0] == "expired"
    assert judge(server_now + MAX_AHEAD_S + 1, server_now, c, "b")[0] == "invalid_payload"


def test_deadline_across_a_reboot_without_sync_keeps_the_remaining_budget():

    d = Deadline(expires_wall=1000.0, deadline_mono=5100.0, boot_id="old", updated_mono=5040.0)
    c2 = FakeClock(mono=30.0, synced=False)  # the new boot's monotonic clock starts near zero
    assert not d.expired(c2, "new")  # 60 s were left at the last status change
    c2.advance(31)
    assert d.expired(c2, "new")
    c3 = FakeClock(wall=990.0, synced=True)
    assert not d.expired(c3, "new")  # once synchronised, the wall clock decides
    assert d.expired(FakeClock(wall=1000.0, synced=True), "new")


def _rec(key, d):
    return Record(key=key, command_id=key, action="reboot_host", status="failed", error_code="x",
                  error_message="y", received_wall=0.0, deadline=d, purge_wall=1e12)


def test_outbox_keeps_order_and_retries_refused_rows(tmp_path):
    loop = Loop()
    clock = FakeClock()
    store = Store(tmp_path)
    d = Deadline(clock.wall() + 100, clock.mono() + 100, "b", clock.mono())
    rows = store.insert(_rec("k", d), [("t/a", b"1"), ("t/b", b"1"), ("t/a", b"2"), ("t/b", b"2")])
    ob = Outbox(store, loop, clock, "b")
    sent: list[tuple[int, str, bytes]] = []

    def publish(topic, payload):
        sent.append((len(sent) + 1, topic, payload))
        return len(sent)

    ob.publish = publish
    ob.add(rows, d)
    assert sent == []  # not connected
    ob.on_connect()
    assert [(t, p) for _, t, p in sent] == [("t/a", b"1"), ("t/b", b"1"), ("t/a", b"2"), ("t/b", b"2")]
    # The first t/a row is refused; the second t/a was pipelined and delivered. The refused one
    # is retried (not dropped), and nothing newer on t/a is sent while it waits.
    assert ob.on_puback(1, 135) is False
    assert ob.on_puback(2, 0) is True and ob.on_puback(4, 0) is True and ob.on_puback(3, 0) is True
    assert [r.payload for r in ob.rows.values()] == [b"1"] and ob.refused == 1
    ob.on_disconnect()
    ob.on_connect()  # at once on reconnect
    assert sent[-1][1:] == ("t/a", b"1")
    ob.on_puback(sent[-1][0], 0)
    ob.flush_now()
    assert store.outbox_rows() == []


def test_outbox_drops_expired_rows_and_survives_a_restart(tmp_path):
    loop = Loop()
    clock = FakeClock()
    store = Store(tmp_path)
    d = Deadline(clock.wall() + 10, clock.mono() + 10, "b", clock.mono())
    store.insert(_rec("k", d), [("t/a", b"1")])
    store.close()
    store = Store(tmp_path)  # "restart"
    ob = Outbox(store, loop, clock, "b")
    assert len(ob.rows) == 1
    clock.advance(11)
    sent = []
    ob.publish = lambda t, p: sent.append(t) or 1
    ob.on_connect()
    assert sent == [] and ob.rows == {} and store.outbox_rows() == []


def test_token_bucket_counts_what_it_drops():
    now = [0.0]
    b = TokenBucket(5, 20, lambda: now[0])
    assert sum(b.take() for _ in range(100)) == 20
    assert b.pop_dropped() == 80
    now[0] += 1.0
    assert sum(b.take() for _ in range(100)) == 5


def test_group_ids():
    assert parse_group(b"lobby") == (True, "lobby")
    assert parse_group(b'"lobby"') == (True, "lobby")
    assert parse_group(b"17") == (True, "17")
    assert parse_group(b"") == (True, None)
    for bad in (b"a/b", b"a+", b"#", b"x" * 65, b"\xff", b"a\nb"):
        assert parse_group(bad)[0] is False


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "f.json"
    handoff.atomic_write(p, b'{"a": 1}')
    handoff.atomic_write(p, json.dumps({"b": "x" * 10000}).encode())
    assert json.loads(p.read_bytes())["b"] == "x" * 10000
    assert [q.name for q in tmp_path.iterdir()] == ["f.json"]


def test_configure_mqtt_security_login_tls_and_warning(tmp_path, caplog):
    import ssl

    from infoscreen.config import load_config
    from infoscreen.workers.mqtt.connection import configure_mqtt_security

    class FakeClient:
        def __init__(self):
            self.login = None
            self.ctx = None

        def username_pw_set(self, u, p):
            self.login = (u, p)

        def tls_set_context(self, ctx):
            self.ctx = ctx

    base = {"INFOSCREEN_ENV": "test", "CLIENT_UUID": "9b8d1856-ff34-4864-a726-12de072d0f77"}
    c = FakeClient()
    with caplog.at_level("WARNING"):
        configure_mqtt_security(c, load_config(base))
    assert c.login is None and "without a broker login" in caplog.text
    caplog.clear()
    c = FakeClient()
    configure_mqtt_security(c, load_config({**base, "MQTT_USER": "u", "MQTT_PASSWORD_BROKER": "s3cret", "MQTT_TLS": "1"}))
    assert c.login == ("u", "s3cret") and "s3cret" not in caplog.text
    assert c.ctx.verify_mode == ssl.CERT_REQUIRED and c.ctx.check_hostname is True


def test_store_keeps_a_bounded_number_of_records(tmp_path):
    from infoscreen.workers.mqtt import store as store_mod
    from infoscreen.workers.mqtt.clock import Deadline
    from infoscreen.workers.mqtt.store import Record, Store

    st = Store(tmp_path)
    st.max_records = 300
    live = None
    for i in range(store_mod.CAP_CHECK_EVERY * 2):
        status = "execution_started" if i == 0 else "failed"
        rec = Record(key=f"k{i}", command_id=f"c{i}", action="reboot_host", status=status, error_code=None,
                     error_message=None, received_wall=float(i),
                     deadline=Deadline(expires_wall=1e12, deadline_mono=1e12, boot_id="b", updated_mono=0.0))
        st.insert(rec, [("t", b"x")])
        live = live or rec.key
    assert st.count() <= 300
    assert st.get(live) is not None  # an unfinished command is never forgotten
    assert st.get(f"k{store_mod.CAP_CHECK_EVERY * 2 - 1}") is not None  # the newest stay
    st.close()


def test_unsynchronised_clock_refuses_a_command_older_than_a_time_already_seen():
    # A screen off over a weekend boots with a stale clock; a command queued for it then must not
    # run on its budget alone: it expired before a time the device had already seen synchronised.
    c = FakeClock(synced=False)
    server_now = c.wall() + 3 * 86400  # the real time; the device's clock is 3 days behind
    stale_expiry = server_now - 2 * 86400  # expired two days ago, with a 10-minute budget
    floor = server_now - 86400  # the device saw this time (synchronised) before it went off
    code, msg, _ = judge(stale_expiry, stale_expiry - 600, c, "b", wall_floor=floor)
    assert code == "expired" and "already seen" in msg
    # Without the floor the budget alone would have accepted it: that is the case guarded.
    assert judge(stale_expiry, stale_expiry - 600, c, "b")[0] is None
    # A command still valid after the floor keeps being judged by its budget.
    assert judge(floor + 300, floor - 300, c, "b", wall_floor=floor)[0] is None


def test_a_deadline_carried_over_a_reboot_keeps_only_what_was_left(tmp_path):
    # Received with a 600 s budget 5 days into a boot, unsynchronised; after a reboot the budget
    # left must be rebased onto the new boot's clock, never inflated by the old boot's uptime.
    from .lifecycle_harness import Device

    # (A wall clock far ahead: no floor of this machine's can make the command expired.)
    c = FakeClock(wall=4_102_444_800.0, mono=5 * 86400.0, synced=False)
    dev = Device(tmp_path, clock=c)
    cid = dev.command("shutdown_host", expires_in=600)  # left unanswered: the power goes off
    assert dev.statuses(cid) == ["accepted", "execution_started"]
    dev.stop()
    c._mono = 30.0  # the new boot, 30 s in
    dev.new_boot()
    dev.start()  # a new boot: completed, with the deadline carried over
    assert dev.statuses(cid)[-1] == "completed"
    rec = dev.store.get(cid.lower())
    assert rec.deadline.boot_id == dev.boot_id
    assert rec.deadline.deadline_mono - c.mono() == pytest.approx(600 - 30)
