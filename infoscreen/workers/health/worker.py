"""The health worker: one report every HEALTH_INTERVAL_S to the supervisor.

The probes run on the worker's main loop, the same loop that sends the heartbeats, so a
probe that hangs (a stuck /proc read) stops the heartbeats and gets the worker replaced.
"""

from __future__ import annotations

from ...ipc import messages
from ..runtime import Worker
from .probes import DisplayProbe, HostProbe, collect


class HealthWorker(Worker):
    name = "health"

    def setup(self) -> None:
        self.display = DisplayProbe(self.cfg.display_process_name, self.cfg.display_pidfile,
                                    self.cfg.display_process_user)
        disk = str(self.cfg.state_dir) if self.cfg.state_dir.exists() else "/"
        self.host = HostProbe(disk, self.cfg.boot_id_file)
        # The first report soon after start (the MQTT worker publishes health at once),
        # then every interval.
        self.loop.call_later(min(1.0, self.cfg.health_interval_s), self._report)

    def _report(self) -> None:
        self.channel.send(collect(self.display, self.host))
        self.loop.call_later(self.cfg.health_interval_s, self._report)

    def on_message(self, msg: messages.Msg) -> None:
        pass  # nothing is routed to this worker


def main() -> int:
    return HealthWorker().run()
