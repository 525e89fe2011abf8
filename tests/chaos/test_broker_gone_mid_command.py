"""Found by the chaos: the broker goes away while the MQTT worker is handling a command.

The worker is frozen (SIGSTOP) while the broker delivers a command into its socket, the broker is
stopped, and the worker resumes: it reads the command, then the end of the connection. Handling
the command publishes its acks from inside paho's `on_message` callback; the broker is gone, so a
write fails, and paho-mqtt 2.2 reports the loss (`_do_on_disconnect`) under its non-reentrant
`_in_callback_mutex`, which that same thread holds for `on_message`: the worker deadlocked
(faulthandler's stack: intake -> lifecycle._intake -> outbox.kick -> Connection.publish ->
Connection._flush -> paho loop_write -> _loop_rc_handle -> _do_on_disconnect). Nothing is lost
(the command's record and ack rows were committed first), but the worker is dead to the world
until the supervisor's hang timeout (WORKER_HANG_TIMEOUT_S, 10 s by default) replaced it, and the
commands still in its socket buffer died with it (the broker delivered them again later).
Fixed: Connection writes nothing from inside loop_read; _on_readable flushes once it returned.
"""

from __future__ import annotations

import os
import signal
import time
import uuid


from infoscreen.wire import topics
from infoscreen.wire.schema import SCHEMA_VERSION, CommandOut, encode, format_utc
from tests.support.waiting import wait_until


def test_worker_survives_the_broker_leaving_while_it_handles_a_command(tree_factory, broker, device_uuid,
                                                                      server_probe):
    # A hang timeout far beyond the window below: the supervisor must not hide a hang.
    tree = tree_factory(broker, device_uuid, env={"WORKER_HANG_TIMEOUT_S": "60"}).start()
    tree.notify.wait_status(lambda s: "broker=connected" in s, timeout=15)
    srv = server_probe()
    worker = tree.worker_pid("mqtt")
    now = int(time.time())
    cmd = CommandOut(schema_version=SCHEMA_VERSION, command_id=str(uuid.uuid4()), client_uuid=device_uuid,
                     action="shutdown_host", issued_at=format_utc(now), expires_at=format_utc(now + 600))
    os.kill(worker, signal.SIGSTOP)
    try:
        assert srv.publish(topics.commands(device_uuid), encode(cmd)) == 0  # in the worker's socket now
        broker.stop()
    finally:
        os.kill(worker, signal.SIGCONT)
    mark = f"infoscreen-mqtt[{worker}] WARNING infoscreen.workers.mqtt.connection: lost the broker connection"
    handled = f"command {cmd.command_id} (shutdown_host): new -> requested"
    try:
        # The same worker handles the command and notices the loss at once.
        wait_until(lambda: handled in tree.log_text() and mark in tree.log_text(), 3,
                   what="the command handled and the loss noticed by the same worker")
        assert tree.workers().get("mqtt") == worker
    finally:
        os.kill(worker, signal.SIGKILL)  # a hung worker ignores SIGTERM: do not make teardown wait for it
