"""Root fixtures: a real Mosquitto provisioned by `infoscreen.ctl.provision`, MQTT test clients,
and generic helpers. Suites in subfolders add their own conftest.py for their own fixtures.

    def test_example(broker, device_uuid, server_probe, device_probe):
        dev = device_probe(device_uuid)                   # logged in as the device's account
        dev.subscribe(f"infoscreen/{device_uuid}/commands")
        assert server_probe().publish(f"infoscreen/{device_uuid}/commands", {"x": 1}) == 0
        assert dev.wait_for(f"infoscreen/{device_uuid}/commands").json() == {"x": 1}
"""

from __future__ import annotations

import sys
import uuid as uuidlib
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so that `tests.support...` imports work from every suite
    sys.path.insert(0, str(ROOT))

from tests.support.broker import MosquittoBroker, free_port  # noqa: E402
from tests.support.mqtt import MqttProbe  # noqa: E402
from tests.support.waiting import wait_process_exit, wait_until  # noqa: E402,F401

__all__ = ["free_port", "wait_until", "wait_process_exit"]


def new_uuid() -> str:
    return str(uuidlib.uuid4())


@pytest.fixture
def device_uuid() -> str:
    """A fresh device identity, provisioned in `broker`."""
    return new_uuid()


@pytest.fixture
def other_device_uuid() -> str:
    """A second provisioned device (for isolation tests)."""
    return new_uuid()


@pytest.fixture
def broker_factory(tmp_path_factory) -> Iterator[Callable[..., MosquittoBroker]]:
    """`broker_factory(devices, **kw) -> MosquittoBroker`, started; every broker made is stopped
    at teardown. kw: host, port, server_user, autosave_interval, start (default True)."""
    made: list[MosquittoBroker] = []

    def make(devices, *, start: bool = True, **kw) -> MosquittoBroker:
        b = MosquittoBroker(list(devices), tmp_path_factory.mktemp("broker"), **kw)
        made.append(b)
        return b.start() if start else b

    yield make
    for b in made:
        b.stop()


@pytest.fixture
def broker(broker_factory, device_uuid, other_device_uuid) -> MosquittoBroker:
    """A real Mosquitto (function-scoped: starting one takes ~20 ms) with accounts for
    `device_uuid` and `other_device_uuid` plus the server account, the production ACL, and
    `user` set to the current account (test config only). `broker.stop()`/`start()` simulate an
    outage on the same port with the same persistence."""
    return broker_factory([device_uuid, other_device_uuid])


@pytest.fixture
def mqtt_probe_factory() -> Iterator[Callable[..., MqttProbe]]:
    """`mqtt_probe_factory(host, port, connect=True, **kw) -> MqttProbe`; all closed at teardown."""
    made: list[MqttProbe] = []

    def make(host: str, port: int, *, connect: bool = True, **kw) -> MqttProbe:
        p = MqttProbe(host, port, **kw)
        made.append(p)
        return p.connect() if connect else p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def server_probe(broker, mqtt_probe_factory) -> Callable[..., MqttProbe]:
    """`server_probe(broker=None, **kw) -> MqttProbe` connected with the server account."""

    def make(on: MosquittoBroker | None = None, **kw) -> MqttProbe:
        b = on or broker
        return mqtt_probe_factory(b.host, b.port, username=b.server_user, password=b.server_password, **kw)

    return make


@pytest.fixture
def device_probe(broker, device_uuid, mqtt_probe_factory) -> Callable[..., MqttProbe]:
    """`device_probe(uuid=device_uuid, broker=None, **kw) -> MqttProbe` connected with the device's
    account, client id = its uuid unless `client_id=` is given."""

    def make(uuid: str | None = None, on: MosquittoBroker | None = None, **kw) -> MqttProbe:
        b = on or broker
        u = uuid or device_uuid
        kw.setdefault("client_id", u)
        return mqtt_probe_factory(b.host, b.port, username=b.device_user(u), password=b.device_password(u), **kw)

    return make


@pytest.fixture
def tree_factory(tmp_path):
    """`tree_factory(broker=None, uuid=None, *, helper=True, env=None, watchdog_usec=1e6) -> Tree`,
    not started: `.start()` returns once READY=1 arrived on the test's NOTIFY_SOCKET. The helper
    runs in mock mode. Every tree made is stopped and cleaned up at teardown (tests/support/tree.py)."""
    from tests.support.tree import Tree

    made: list = []

    def make(broker=None, uuid=None, **kw):
        t = Tree(tmp_path / f"tree{len(made)}", broker, uuid, **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.cleanup()
