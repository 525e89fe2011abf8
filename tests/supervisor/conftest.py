"""Fixtures of the supervisor tests that drive a whole tree."""

from __future__ import annotations

import pytest

from infoscreen.wire import topics


@pytest.fixture
def running(tree_factory, broker, device_uuid, server_probe):
    """(tree, server probe subscribed to the device's acks), once the worker is connected."""
    tree = tree_factory(broker, device_uuid).start()
    tree.notify.wait_status(lambda s: "broker=connected" in s, timeout=15)
    srv = server_probe()
    srv.subscribe(topics.ack(device_uuid))
    return tree, srv
