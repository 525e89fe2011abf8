"""``infoscreen-notify-failure UNIT``: the retained ``service_failed`` alert, sent when systemd gave up.

Run by ``infoscreen-notify-failure@UNIT.service``, which ``OnFailure=`` of the client's unit starts.
``OnFailure=`` fires at different moments across systemd versions (on some, at every failure even
while an automatic restart is still pending), so this program first asks systemd for the unit's
real state (``systemctl show``, fixed argv, no shell) and alerts only when it has given up
(``ActiveState=failed``). While the unit is between two lives it waits, bounded, for the outcome:
if systemd's last attempt fails meanwhile, this instance must alert (systemd would merge a second
OnFailure start into this running instance).

The alert is the contract's payload on ``infoscreen/{uuid}/service_failed``, QoS 1, retained, MQTT
5, with the device's own account, delivered only on a PUBACK below 128; a broker that is down is
retried with backoff for a bounded time. The broker binds the device's account to its client id,
so this program connects as the device itself, and resumes its persistent session without
touching it: no clean start, the worker's session expiry, and nothing the broker delivers is
ever acknowledged, so commands queued for the screen stay in the session for the worker.

Exit status: 0 alert delivered, or no alert needed (the reason is printed); 1 could not deliver;
2 bad usage or configuration (one line naming the variable). Configuration: the client's own
variables, from the environment (the unit's ``EnvironmentFile=``) or ``--env-file``; only those
needed, through the client's own parser: a bad value of an unrelated variable, which may be why
the client crash-looped, must not also silence its alert.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from infoscreen import __version__
from infoscreen.config import ClientConfig, ConfigError, load_config, read_env_file, validate_client_uuid
from infoscreen.mqttclient import Session, SessionError, Settings, rc_text
from infoscreen.wire import topics
from infoscreen.wire.schema import UNIT_PATTERN, ServiceFailed, encode, format_utc

PROG = "infoscreen-notify-failure"
EXIT_OK, EXIT_UNDELIVERED, EXIT_USAGE = 0, 1, 2
NEEDED_VARS = ("CLIENT_UUID", "MQTT_BROKER", "MQTT_PORT", "MQTT_USER", "MQTT_PASSWORD_BROKER", "MQTT_TLS",
               "MQTT_CA_FILE", "MQTT_CERT_FILE", "MQTT_KEY_FILE", "INFOSCREEN_STATE_DIR")
UNIT_RE = re.compile(UNIT_PATTERN)
SHOW_PROPS = ("ActiveState", "SubState", "Result", "NRestarts", "StateChangeTimestampMonotonic")
UNSETTLED_ACTIVE = {"activating", "deactivating", "reloading"}  # systemd has not decided yet
# The MQTT worker's session expiry (infoscreen/workers/mqtt/connection.py, tied by a test): the
# last CONNECT sets the session's expiry, and this one must not shorten the worker's.
SESSION_EXPIRY_S = 7 * 86400
SETTLE_INTERVAL = 0.5  # s between two `systemctl show` while a restart is pending


def log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ systemd state
@dataclass
class UnitState:
    active: str
    sub: str
    result: str
    n_restarts: str
    changed_mono_us: int | None

    @property
    def settled(self) -> bool:
        return self.active not in UNSETTLED_ACTIVE and self.sub != "auto-restart"

    def __str__(self) -> str:
        return f"ActiveState={self.active} SubState={self.sub} Result={self.result} NRestarts={self.n_restarts}"


def systemctl_path() -> str:
    for p in ("/usr/bin/systemctl", "/bin/systemctl"):
        if os.access(p, os.X_OK):
            return p
    return shutil.which("systemctl") or "/usr/bin/systemctl"


def query_unit(unit: str, timeout: float = 15.0) -> UnitState:
    """``systemctl show`` with a fixed argv and a minimal environment; RuntimeError on failure."""
    argv = [systemctl_path(), "show", "-p", ",".join(SHOW_PROPS), "--", unit]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"systemctl show failed: {exc.__class__.__name__}: {exc}") from None
    if r.returncode != 0:
        raise RuntimeError(f"systemctl show exited {r.returncode}: {r.stderr.strip()[:300]}")
    props = dict(line.partition("=")[::2] for line in r.stdout.splitlines())
    mono = props.get("StateChangeTimestampMonotonic", "")
    return UnitState(props.get("ActiveState", ""), props.get("SubState", ""), props.get("Result", ""),
                     props.get("NRestarts", ""), int(mono) if mono.isdigit() and int(mono) > 0 else None)


def settle(unit: str, timeout: float, query: Callable[[str], UnitState] | None = None,
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> UnitState:
    """The unit's state once systemd has decided, or the last one seen when `timeout` passes
    first. Without D-Bus signal plumbing there is no event to wait on: this polls, bounded."""
    query = query or query_unit
    deadline = clock() + timeout
    state = query(unit)
    if not state.settled:
        log(f"{unit} is between two lives ({state}); waiting up to {timeout:g} s for systemd's decision")
    while not state.settled and clock() < deadline:
        sleep(SETTLE_INTERVAL)
        state = query(unit)
    return state


def failed_at_from(state: UnitState | None) -> float:
    """Wall-clock time of the unit's last state change (when it entered ``failed``), else now."""
    now = time.time()
    if state is None or state.changed_mono_us is None:
        return now
    age = time.monotonic() - state.changed_mono_us / 1e6
    return now - age if 0 <= age < 86400 else now


# ---------------------------------------------------------------------------- configuration
def load_alert_config(environ: Mapping[str, str], env_file: str | None) -> ClientConfig:
    merged: dict[str, str] = dict(read_env_file(env_file)) if env_file else {}
    merged.update(environ)
    return load_config({k: merged[k] for k in NEEDED_VARS if k in merged})


def resolve_uuid(cfg: ClientConfig) -> str:
    if cfg.client_uuid:
        return cfg.client_uuid
    path = cfg.state_dir / "client_uuid"
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise ConfigError("CLIENT_UUID", f"not set, and {path} cannot be read ({exc.strerror})") from None
    try:
        return validate_client_uuid(text)
    except ConfigError:
        raise ConfigError("CLIENT_UUID", f"not set, and {path} holds no UUID") from None


def alert_payload(unit: str, client_uuid: str, failed_at: float) -> bytes:
    """The contract's payload (wire.schema.ServiceFailed: its four keys, in its order)."""
    return encode(ServiceFailed(unit=unit, client_uuid=client_uuid, failed_at=format_utc(failed_at)))


# ---------------------------------------------------------------------------------- delivery
class PermanentFailure(Exception):
    pass


class TransientFailure(Exception):
    pass


def publish_once(cfg: ClientConfig, topic: str, payload: bytes, client_uuid: str, timeout: float) -> None:
    """Resume the device's session, publish QoS 1 retained, wait for the PUBACK, disconnect
    (a normal DISCONNECT: the session stays, with the worker's expiry)."""
    # receive=False: what the session delivers is never acknowledged, so the broker keeps it
    # (unacknowledged messages are sent again when the worker resumes the session).
    session = Session(Settings.from_config(cfg, client_id=client_uuid, connect_timeout=timeout), receive=False)
    if not cfg.mqtt_user:
        log("warning: connecting without a broker login (MQTT_USER is not set)")
    try:
        try:  # take as little of the session's queue in flight as MQTT allows
            session.connect(session_expiry=SESSION_EXPIRY_S, receive_maximum=1)
        except SessionError as exc:
            if exc.code is None:
                raise TransientFailure(str(exc)) from None
            msg = f"broker refused the connection: {rc_text(exc.code)} (0x{exc.code:02X})"
            raise (PermanentFailure if exc.permanent else TransientFailure)(msg) from None
        try:
            session.publish(topic, payload, qos=1, retain=True, timeout=timeout)
        except SessionError as exc:  # 0x87 not authorized (the ACL), 0x95 too large...: a retry cannot help
            if exc.code is None:
                raise TransientFailure(str(exc)) from None
            raise PermanentFailure(f"broker refused the alert: PUBACK {rc_text(exc.code)} (0x{exc.code:02X})") from None
    finally:
        session.close(end_session=False)


def deliver(cfg: ClientConfig, topic: str, payload: bytes, client_uuid: str, budget: float,
            attempt_timeout: float = 10.0, publish: Callable[..., None] = publish_once,
            sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> bool:
    """Retry transient failures with capped exponential backoff until `budget` seconds passed."""
    deadline = clock() + budget
    delay, attempt = 0.5, 0
    while True:
        attempt += 1
        try:
            publish(cfg, topic, payload, client_uuid, max(1.0, min(attempt_timeout, deadline - clock())))
            log(f"alert delivered on {topic} (attempt {attempt})")
            return True
        except PermanentFailure as exc:
            log(f"giving up: {exc}")
            return False
        except TransientFailure as exc:
            left = deadline - clock()
            if left <= 0:
                log(f"giving up after {attempt} attempts in {budget:g} s: {exc}")
                return False
            wait = min(delay, left)
            log(f"attempt {attempt} failed ({exc}); retrying in {wait:.1f} s")
            sleep(wait)
            delay = min(delay * 2, 10.0)


# -------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Publish the retained service_failed alert for UNIT "
                                                       "when systemd has given up on it.")
    p.add_argument("unit", metavar="UNIT", help="the failed unit, e.g. infoscreen-simclient.service")
    p.add_argument("--env-file", help="read the client's variables from this file too (the environment wins)")
    p.add_argument("--settle-timeout", type=float, default=60.0, help="how long to wait for systemd's decision "
                   "while an automatic restart is pending (default 60)")
    p.add_argument("--deliver-timeout", type=float, default=90.0,
                   help="how long to retry while the broker is unreachable (default 90)")
    p.add_argument("--no-state-check", action="store_true", help="alert without asking systemd (manual use, tests)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unit = args.unit
    if not UNIT_RE.fullmatch(unit):
        log(f"not a unit name: {unit!r}")
        return EXIT_USAGE
    try:
        cfg = load_alert_config(os.environ if environ is None else environ, args.env_file)
        client_uuid = resolve_uuid(cfg)
    except ConfigError as exc:
        log(str(exc))
        return EXIT_USAGE
    state: UnitState | None = None
    if not args.no_state_check:
        try:
            state = settle(unit, args.settle_timeout)
        except RuntimeError as exc:  # better a false alert than a missed one: OnFailure= did fire
            log(f"cannot read the state of {unit} ({exc}); alerting anyway")
        if state is not None and state.active != "failed":
            why = ({"active": "systemd restarted it and it is running again", "inactive": "it is stopped, not failed"}
                   .get(state.active, "systemd has not given up on it") if state.settled
                   else f"systemd has not decided within {args.settle_timeout:g} s")
            log(f"no alert: {unit} {state}: {why}")
            return EXIT_OK
        if state is not None:
            log(f"{unit} has failed for good ({state}); alerting")
    payload = alert_payload(unit, client_uuid, failed_at_from(state))
    ok = deliver(cfg, topics.service_failed(client_uuid), payload, client_uuid, args.deliver_timeout)
    return EXIT_OK if ok else EXIT_UNDELIVERED


if __name__ == "__main__":
    sys.exit(main())
