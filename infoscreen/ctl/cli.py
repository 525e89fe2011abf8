"""`infoscreenctl`: the operator's and the server side's tool for the infoscreen fleet.

    infoscreenctl send reboot|shutdown --device UUID [--expires-in 10m] [--wait] [--timeout D]
                       [--keys DIR] [--unsigned]
    infoscreenctl watch [--json] [--device UUID] [--once|--count N|--duration S]
    infoscreenctl alerts [--json]            infoscreenctl alerts clear UUID [UUID...]
    infoscreenctl broker provision --devices FILE --out DIR [--listen ADDR] [--port N]

Every command that talks to the broker logs in with the server account, normally from the
``server.env`` that ``broker provision`` writes: ``--env server.env`` (or ``$INFOSCREENCTL_ENV``).
`send` signs a power command with the device's command key, found in the directory
``INFOSCREEN_COMMAND_KEYS`` of that file (or ``--keys DIR``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from infoscreen import __version__
from infoscreen.ctl import alerts, send, watch


def _register_broker(subparsers) -> None:
    broker = subparsers.add_parser("broker", help="broker administration (provision)",
                                   description="Broker administration.")
    broker_sub = broker.add_subparsers(dest="broker_command", metavar="COMMAND")
    broker_sub.required = True
    try:
        from infoscreen.ctl import provision
    except ImportError as exc:  # written in parallel; keep the rest of the CLI usable without it
        reason = str(exc)
        p = broker_sub.add_parser("provision", help="(unavailable)", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)

        def unavailable(args: argparse.Namespace) -> int:
            print(f"infoscreenctl broker provision: not available in this installation ({reason})",
                  file=sys.stderr)
            return 2

        p.set_defaults(func=unavailable)
        return
    provision.register(broker_sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infoscreenctl",
        description="The operator's and the server side's tool for the infoscreen fleet: send power "
                    "commands and follow their acks, watch the screens, clear alerts, provision the broker.",
        epilog="Run 'infoscreenctl COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    send.register(sub)
    watch.register(sub)
    alerts.register(sub)
    _register_broker(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
