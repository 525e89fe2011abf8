"""`infoscreen-simclient`: the main process of infoscreen-simclient.service."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import zmq

from .. import __version__, logsetup
from ..config import ConfigError, ensure_client_uuid, load_config
from ..ipc.channel import SupervisorChannel, prepare_runtime_dir
from ..loop import Loop
from .notify import Notifier
from .policy import Params
from .process import OsProcesses, make_non_dumpable, worker_environment
from .tree import WORKERS, Supervisor

EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infoscreen-simclient",
        description="The infoscreen client: the supervisor of the MQTT and health workers, the main process of "
                    "infoscreen-simclient.service. Its settings come from the environment (docs/configuration.md).")
    parser.add_argument("--env-file", help="KEY=VALUE file read for variables the environment does not set")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration, print what it says, start nothing (exit 0 or 2)")
    return parser


def check_config(env_file: str | None) -> int:
    """Validate without side effects: no identity generated, no directory made, nothing started."""
    try:
        cfg = load_config(env_file=env_file)
    except ConfigError as exc:
        print(f"infoscreen-simclient: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    device = cfg.client_uuid or "(none: generated at the first start)"
    tls = "TLS" if cfg.mqtt_tls else "plaintext"
    login = f"as {cfg.mqtt_user}" if cfg.mqtt_user else "without a login (warned at start)"
    print(f"infoscreen-simclient: configuration ok: device {device}, broker {cfg.mqtt_broker}:{cfg.mqtt_port} "
          f"({tls}) {login}, environment {cfg.environment}, display process {cfg.display_process_name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # First thing: the environment systemd handed us holds the broker password, and a dumpable
    # process's /proc/<pid>/environ, memory and ptrace are open to every process of our uid.
    make_non_dumpable()
    args = build_parser().parse_args(argv)
    if args.check_config:
        return check_config(args.env_file)
    log = logsetup.setup("infoscreen-simclient")

    try:
        cfg = ensure_client_uuid(load_config(env_file=args.env_file))
    except ConfigError as exc:
        print(f"infoscreen-simclient: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if cfg.production and os.geteuid() == 0:
        print(
            "infoscreen-simclient: refusing to run as root with INFOSCREEN_ENV=production; "
            "run it as the service's unprivileged user (User= in the unit)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        cfg.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        prepare_runtime_dir(cfg.runtime_dir)
    except OSError as exc:
        print(f"infoscreen-simclient: cannot prepare {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG

    loop = Loop()
    ctx = zmq.Context.instance()
    channel = SupervisorChannel(ctx, cfg.runtime_dir)
    notifier = Notifier()
    params = Params(
        hang_timeout_s=cfg.worker_hang_timeout_s,
        start_timeout_s=max(cfg.worker_hang_timeout_s, 5.0),
        max_restarts=cfg.max_restarts,
        restart_window_s=cfg.restart_window_s,
    )
    config_env = cfg.to_environ()
    child_envs = {w: worker_environment(w, os.environ, config_env) for w in WORKERS}
    sup = Supervisor(
        cfg, loop, channel, notifier,
        control_factory=lambda on_exit: OsProcesses(loop, child_envs, on_exit),
        params=params,
    )
    loop.add_signal_handler(signal.SIGTERM, lambda: sup.request_stop("SIGTERM"))
    loop.add_signal_handler(signal.SIGINT, lambda: sup.request_stop("SIGINT"))
    log.info("starting for device %s (%s)", cfg.client_uuid, cfg.environment)
    try:
        return sup.run()
    finally:
        channel.close()
        logging.shutdown()


if __name__ == "__main__":
    sys.exit(main())
